"""`plan --verify`, the calibration file and what the dataset decides in a plan.

The verification runs a real stage (tiny: 32^3, 4 filters) for one step in a fresh
process and compares with the plan; the calibration it records changes the next plan.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import load_plan, load_stage
from orchestrator.errors import ConfigError, PlanError
from orchestrator.planning import calibration as cal
from orchestrator.planning.plan_file import PlanRequest, make_plan, verify_and_calibrate, write_plan
from orchestrator.planning.schedule import batch_cap, derive_schedule, job_time_min, measure_dataset
from orchestrator.planning.verify import verify_stage
from orchestrator.training.step import estimation_step

REPO = Path(__file__).resolve().parent.parent
WORKER = "orchestrator.training.trial"


def _curriculum(tmp_path: Path, name: str = "one", **over: object) -> Path:
    """A one-stage curriculum: stage 1 at test scale (YAML overrides `over` on top)."""
    stage = REPO / "stages" / "stage1_basic_cnn.yaml"
    extra = "".join(f"\n  {k}: {json.dumps(v)}" for k, v in over.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nstages:\n  - file: {stage}\noverrides:\n"
                    "  input_size_vox: [32, 32, 32]\n  base_filters: 4\n  amp: false\n"
                    "  planner: {min_base_filters: 4, min_input_vox: 32, max_batch_size: 2, "
                    f"min_batch_size: 2}}{extra}\n")
    return path


@pytest.fixture
def cal_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache" / "calibration.json"
    monkeypatch.setenv(cal.ENV_VAR, str(path))
    return path


def _plan(tmp_path: Path, curriculum: Path, run: str, device: str = "cpu", data: Path | None = None):
    req = PlanRequest(curriculum=curriculum, target_mem_gb=2.0, device=device,  # type: ignore[arg-type]
                      run=run, runs_dir=tmp_path / "runs", data_dir=data)
    return make_plan(req, estimation_step)


def test_verify_measures_a_real_step_records_and_calibrates_the_next_plan(tmp_path, cal_file) -> None:
    cur = _curriculum(tmp_path)
    plan = _plan(tmp_path, cur, "first")
    path = write_plan(plan)
    verified = verify_and_calibrate(plan, path, WORKER, steps=1)
    sp = verified.stages[0]
    m = sp.measurement
    assert m is not None and "error" not in m, m
    # the fake run saw the same tensors as the real one (the estimator's own quantity)
    assert m["tensor_ratio"] == pytest.approx(1.0, abs=0.02)
    # the process peak holds the baseline and the live tensors, and is what measured_gb says
    assert m["peak_gb"] >= m["baseline_gb"] + 0.9 * m["tensor_peak_gb"]
    assert sp.measured_gb == pytest.approx(m["peak_gb"], abs=1e-4)
    # the trial runs training steps: compared with the training step's prediction (the
    # stage's peak may be validation's)
    assert sp.train_gb is not None and sp.predicted_gb == max(sp.train_gb, sp.val_gb)
    assert m["ratio"] == pytest.approx(m["peak_gb"] / sp.train_gb, rel=1e-3)
    assert "VmHWM" in m["method"] and m["steps"] == 1
    # the measured step time sets the stage's job time (used where the profile has none)
    assert m["step_s"] > 0
    assert sp.time_estimate_min == job_time_min(sp.spec, m["step_s"])[0]
    assert any(r.startswith(f"job time {sp.time_estimate_min} min: ") for r in sp.reasons)
    again = load_plan(path)  # written back
    assert again.stages[0].measured_gb == sp.measured_gb
    assert again.assumptions.calibration.recorded.stages == [sp.name]

    doc = json.loads(cal_file.read_text())
    (hardware, entries), = doc["hardware"].items()
    assert hardware.startswith("cpu|") and entries[sp.name]["ratio"] == m["uncalibrated_ratio"]

    later = _plan(tmp_path, cur, "second").stages[0]
    assert later.calibration_ratio == pytest.approx(m["uncalibrated_ratio"], abs=1e-4)
    assert later.predicted_gb == pytest.approx(sp.predicted_gb * later.calibration_ratio, rel=1e-3)
    assert any("measured/predicted" in r for r in later.reasons)
    # another stage spec under the same name is not calibrated by it
    other = _plan(tmp_path, _curriculum(tmp_path, "other", lr=0.01), "third").stages[0]
    assert other.calibration_ratio is None


def test_a_plan_applies_the_highest_of_an_entrys_last_runs(tmp_path: Path) -> None:
    """A process's peak moves a few percent between runs of one configuration; the plan
    takes the highest of the last `HISTORY` runs (too low a prediction is an OOM)."""
    path, key = tmp_path / "cal.json", "cpu|x|torch"
    spec = load_stage(REPO / "stages" / "stage3_hybrid_small.yaml")
    name = cal.entry_name(spec.name, True)

    def verify_once(ratio: float, stage=spec) -> None:
        cal.record_ratios(path, key, {name: {"stage": stage.name, "ratio": ratio}}, {stage.name: stage})

    verify_once(1.076)
    ((ratio, where),) = cal.load_ratios(path, key, [spec]).values()
    assert ratio == 1.076 and where.startswith("`plan --verify` on ")
    for r in (1.138, 1.05):
        verify_once(r)
    ((ratio, where),) = cal.load_ratios(path, key, [spec]).values()
    assert ratio == 1.138 and "the highest of its last 3 runs" in where
    for r in (1.0,) * cal.HISTORY:  # the old ones age out
        verify_once(r)
    assert cal.load_ratios(path, key, [spec])[name][0] == 1.0
    # a changed stage starts its history over
    changed = spec.model_copy(update={"lr": spec.lr / 2})
    verify_once(0.9, changed)
    assert json.loads(path.read_text())["hardware"][key][name]["ratios"] == [0.9]
    # an entry written before the history was kept: its one ratio
    doc = json.loads(path.read_text())
    del doc["hardware"][key][name]["ratios"]
    path.write_text(json.dumps(doc))
    assert cal.load_ratios(path, key, [changed])[name][0] == 0.9


def test_a_failing_worker_is_reported_not_raised(tmp_path, cal_file) -> None:
    plan = _plan(tmp_path, _curriculum(tmp_path), "broken")
    path = write_plan(plan)
    m = verify_stage(plan, path, plan.stages[0], "orchestrator.no_such_worker", 1)
    assert m["error"].startswith("exit 1:") and "No module named" in m["error"]


def test_verify_of_a_gpu_plan_needs_a_gpu(tmp_path, cal_file) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    plan = _plan(tmp_path, _curriculum(tmp_path), "gpu", device="cuda")
    with pytest.raises(PlanError, match=r"--verify: plan gpu is for cuda and this machine has no GPU"):
        verify_and_calibrate(plan, write_plan(plan), WORKER, steps=1)


def test_calibration_file_bad_or_off(tmp_path, monkeypatch) -> None:
    bad = tmp_path / "cal.json"
    bad.write_text("{not json")
    monkeypatch.setenv(cal.ENV_VAR, str(bad))
    with pytest.raises(ConfigError, match=r"cal\.json: unreadable calibration file .* delete it or set "
                                          r"ORCHESTRATOR_CALIBRATION=off"):
        cal.load_ratios(cal.calibration_path(), "cpu|x|torch", [])
    bad.write_text('{"version": 99}')
    with pytest.raises(ConfigError, match=r"cal\.json: version/hardware: expected a version 1"):
        cal.load_ratios(bad, "cpu|x|torch", [])
    monkeypatch.setenv(cal.ENV_VAR, "off")
    assert cal.calibration_path() is None
    monkeypatch.delenv(cal.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cal.calibration_path() == tmp_path / "xdg" / "orchestrator" / "calibration.json"


def test_dataset_caps_batch_and_sets_the_schedule(tmp_path, tiny_data, cal_file) -> None:
    """4 subjects of 32^3 (3 for training): 5 % of 98,304 voxels is less than one 32^3
    sample, so the batch stays at the minimum even where the stage allows 8."""
    cur = _curriculum(tmp_path, planner={"min_base_filters": 4, "min_input_vox": 32,
                                         "max_batch_size": 8, "min_batch_size": 2})
    ds = measure_dataset(tiny_data)
    assert len(ds.records) == 4 and set(ds.voxels.values()) == {32**3}
    plan = _plan(tmp_path, cur, "data", data=tiny_data)
    sp = plan.stages[0]
    assert sp.batch_size == 2
    assert any(r.startswith("batch 2: capped by the dataset: a batch covers at most 5% of the 3 "
                            "training subjects' 98,304 voxels") for r in sp.reasons), sp.reasons
    # no max_epochs / iterations_per_epoch in the stage YAML: the dataset sets them
    assert sp.spec.iterations_per_epoch == 20  # ceil(98304 / (32768 * 2)) = 2, at least 20
    assert sp.spec.max_epochs == 1000  # 25,000 steps / 20, at most 1000
    assert any(r.startswith("iterations_per_epoch 20: an epoch draws about the 98,304 voxels")
               for r in sp.reasons)
    assert plan.assumptions.dataset.model_dump() == {"root": str(tiny_data), "subjects": 4,
                                           "voxels": 4 * 32**3}
    # explicit values in the YAML are kept
    fixed = _curriculum(tmp_path, "fixed", max_epochs=3, iterations_per_epoch=7)
    sp_fixed = _plan(tmp_path, fixed, "fixed", data=tiny_data).stages[0]
    assert (sp_fixed.spec.max_epochs, sp_fixed.spec.iterations_per_epoch) == (3, 7)


def test_schedule_follows_the_dataset_size(tmp_path, tiny_data) -> None:
    from orchestrator.config import load_curriculum

    _cur, stages = load_curriculum(_curriculum(tmp_path))
    spec = stages[0][0]
    ds = measure_dataset(tiny_data)
    big = type(ds)(ds.root, ds.records, dict.fromkeys(ds.voxels, 200 ** 3))  # ATLAS-sized volumes
    assert batch_cap(spec, ds)[0] == 2 and batch_cap(spec, big)[0] == int(0.05 * 3 * 200**3 / 32**3)
    update, _ = derive_schedule(spec, (32, 32, 32), 4, big)
    assert update == {"iterations_per_epoch": 184, "max_epochs": 136}  # 3*200^3/(32^3*4); 25000/184


def test_calibration_applies_only_to_the_measured_checkpointing_mode(tmp_path, cal_file) -> None:
    cur = _curriculum(tmp_path)
    plan = _plan(tmp_path, cur, "a")
    sp = plan.stages[0]
    assert not sp.checkpointing and sp.calibration_ratio is None
    info = plan.assumptions.calibration.model_dump()
    specs, fps = {sp.name: sp.spec}, info["fingerprints"]
    cal.record_ratios(cal_file, info["hardware"],
                      {cal.entry_name(sp.name, True): {"stage": sp.name, "ratio": 2.0}}, specs, fps)
    same = _plan(tmp_path, cur, "b").stages[0]  # a checkpointed measurement does not apply
    assert same.calibration_ratio is None and same.predicted_gb == sp.predicted_gb
    cal.record_ratios(cal_file, info["hardware"],
                      {cal.entry_name(sp.name, False): {"stage": sp.name, "ratio": 1.25}}, specs, fps)
    later = _plan(tmp_path, cur, "c").stages[0]
    assert later.calibration_ratio == 1.25
    assert later.predicted_gb == pytest.approx(sp.predicted_gb * 1.25, rel=1e-3)
    assert any("measured/predicted without checkpointing" in r for r in later.reasons)
