"""Host memory bounded by the job: the volume cache of raw-NIfTI training at ATLAS size."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_plans import quick_tiny_plan

from orchestrator.atomic import atomic_write_text
from orchestrator.config import plan_to_yaml
from orchestrator.data.host_memory import ATLAS_VOXELS, GIB, cache_bound, job_mem_gb, raw_data_notice
from orchestrator.data.records import SubjectRecord
from orchestrator.data.synth import synthesize_atlas
from orchestrator.planning.memory import DEFAULT_OVERHEADS
from orchestrator.planning.planner import Budget, plan_stage
from orchestrator.training.step import estimation_step

ATLAS_SHAPE = (197, 233, 189)
SUBJECTS = 25  # 24 train + 1 validation (val_fraction 0.05): 12 steps of 2 visit all 24
DISTINCT = 4   # synthesised; the rest are hard links under other subject names (same bytes)


def test_cache_bound_takes_what_the_job_leaves() -> None:
    gb, mb = GIB, 1024**2
    b = cache_bound(4, "test", workers=2, subject_bytes=80 * mb, main_rss_bytes=gb // 2)
    # 4 GB x 0.9 - 0.5 GB main - 2 x 0.55 GB workers = 2.0 GB, 1.0 GB a worker -> 12 subjects
    assert b.subjects == 12 and b.processes == 2
    # and a step of 0.6 GB in the main process, 0.25 GB to load a subject in each worker
    assert cache_bound(4, "t", 2, 80 * mb, gb // 2, gb // 4, 6 * gb // 10).subjects == 5
    assert cache_bound(4, "t", 0, 80 * mb, gb // 2).subjects == 39  # 3.1 GB, main loads itself
    assert cache_bound(64, "t", 4, 80 * mb, gb).subjects > 100
    assert cache_bound(1, "t", 4, 80 * mb, gb).subjects == 1  # never 0: a patch needs one
    assert "12 subject(s)" in b.describe()


def test_job_memory_prefers_slurm_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)
    assert job_mem_gb(4) == (4.0, "the cluster profile's mem_gb")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1024")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "3")
    assert job_mem_gb(4)[0] == 3.0
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "6144")
    assert job_mem_gb(4) == (6.0, "SLURM_MEM_PER_NODE")


@pytest.fixture(scope="module")
def atlas_size_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    synthesize_atlas(root, DISTINCT, ATLAS_SHAPE, seed=0)
    anat = sorted(root.glob("Training/*/sub-*/ses-1/anat"))
    for k in range(DISTINCT, SUBJECTS):
        src = anat[k % DISTINCT]
        old = src.parts[-3]
        new = f"sub-r009s{k:03d}"
        dst = root / "Training" / "R009" / new / "ses-1" / "anat"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            os.link(f, dst / f.name.replace(old, new))
    return root


def _tree_rss(proc: psutil.Process) -> tuple[int, list[int]]:
    """The process tree's summed RSS (as SLURM's jobacct_gather/linux sums it), and each."""
    rss = []
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # gone since children() listed it
            rss.append(p.memory_info().rss)
    return sum(rss), rss


def test_atlas_size_raw_nifti_stays_within_the_jobs_memory(tmp_path: Path,
                                                           atlas_size_tree: Path) -> None:
    """Stage 1 at 96^3 from raw NIfTI with 2 workers: the process tree's peak RSS (what
    SLURM's accounting sums) stays within the local profile's mem_gb (4 GB)."""
    steps, batch = 12, 2
    plan, path = quick_tiny_plan(tmp_path / "runs", atlas_size_tree)
    s1 = plan.stages[0]
    spec = s1.spec.model_copy(update={"input_size_vox": (96, 96, 96), "base_filters": 4,
                                      "batch_size": batch, "num_workers": 2, "val_fraction": 0.05,
                                      "iterations_per_epoch": 50, "max_epochs": 1, "augment": False})
    # the planner's predicted step peak (what a real plan carries; the main process's share)
    est = plan_stage(spec, None, Budget(8.0, DEFAULT_OVERHEADS["cpu"], cuda_target=False),
                     estimation_step)
    assert (est.input_size_vox, est.base_filters, est.batch_size) == ((96,) * 3, 4, batch)
    s1 = s1.model_copy(update={"spec": spec, "input_size_vox": (96, 96, 96), "base_filters": 4,
                               "batch_size": batch, "train_gb": est.train_gb,
                               "predicted_gb": est.predicted_gb})
    plan = plan.model_copy(update={"stages": [s1, *plan.stages[1:]]})
    atomic_write_text(path, plan_to_yaml(plan))
    n_train = SUBJECTS - 1
    assert steps * batch >= n_train >= 24  # every training subject is visited at least once
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    code = ("import logging, sys; from orchestrator.training.trainer import run_stage; "
            "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s'); "
            f"r = run_stage(sys.argv[1], 'stage1_basic_cnn', max_steps={steps}, device='cpu'); "
            "assert r['interrupted'], r")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, parts = psutil.Process(proc.pid), 0, ""
    while proc.poll() is None:
        now, rss = _tree_rss(ps)
        if now > peak:
            peak, parts = now, " + ".join(f"{r / GIB:.2f}" for r in rss)
        time.sleep(0.1)
    log = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, log[-3000:]
    assert "volume cache: at most" in log, log[-2000:]
    limit = plan.cluster.mem_gb
    said = f"peak tree RSS {peak / GIB:.2f} GB ({parts}) vs mem_gb {limit:g} GB\n{log[-1500:]}"
    print(said)
    assert peak / GIB <= limit, said


def test_plan_on_raw_data_says_what_the_cache_saves(tmp_path: Path) -> None:
    raw = SubjectRecord("sub-1", "ses-1", tmp_path / "a_T1w.nii.gz", tmp_path / "a_mask.nii.gz")
    said = raw_data_notice(str(tmp_path), [raw], ATLAS_VOXELS, samples_per_epoch=2000, workers=4)
    assert said and f"orchestrator data cache {tmp_path}" in said
    assert "about 30 min of loading per epoch" in said  # 2000 x 3.6 s / 4 workers
    cached = SubjectRecord("sub-1", "ses-1", raw.image, raw.mask, cached=tmp_path / "s.h5")
    assert raw_data_notice(str(tmp_path), [cached], ATLAS_VOXELS, 2000, 4) is None
