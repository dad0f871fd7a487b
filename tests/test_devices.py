"""The GPU by default where there is one (issue 12): commands run on CUDA when a GPU is
visible; `plan` on a GPU-less login node plans for the default cluster profile's GPU, or
says first that it plans for the CPU and how to change that."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_CURRICULUM
from tiny_plans import one_stage_curriculum, quick_tiny_plan
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import default_cluster, resolve_cluster
from orchestrator.errors import ConfigError
from orchestrator.plan_facts import ProbeRecord
from orchestrator.planning import plan_file
from orchestrator.planning.plan_file import PlanRequest, cpu_plan_notice, make_plan
from orchestrator.planning.probe import slurm_answers
from orchestrator.training import devices, predict
from orchestrator.training.step import estimation_step
from orchestrator.training.trainer import run_stage


def test_auto_is_the_gpu_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="--device cuda: no CUDA device is visible"):
            devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match="expected auto, cuda or cpu, got 'gpu'"):
        devices.resolve_device("gpu")
    # what cannot exist here: a visible GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cpu") == torch.device("cpu")  # the way to refuse it


def test_predict_and_evaluate_ask_for_auto_by_default(tmp_path: Path, tiny_data: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`predict` and `evaluate` without --device resolve 'auto' (the GPU on a GPU node)."""
    _, path = quick_tiny_plan(tmp_path / "runs", tiny_data)
    final = Path(run_stage(path, "stage1_basic_cnn")["final"])
    asked: list[str] = []
    real = devices.resolve_device

    def recording(name: str = "auto") -> torch.device:
        asked.append(name)
        return real("cpu")

    monkeypatch.setattr(predict, "resolve_device", recording)
    image = next(tiny_data.rglob("*T1w.nii.gz"))
    res = CliRunner().invoke(app, ["predict", "--checkpoint", str(final), "--input", str(image),
                                   "--out", str(tmp_path / "pred.nii.gz")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(final), "--data", str(tiny_data),
                                   "--out", str(tmp_path / "eval"), "--json"])
    assert res.exit_code == 0, res.output
    assert asked == ["auto", "auto"]
    res = CliRunner().invoke(app, ["predict", "--checkpoint", str(final), "--input", str(image),
                                   "--out", str(tmp_path / "pred2.nii.gz"), "--device", "cpu"])
    assert res.exit_code == 0 and asked[-1] == "cpu"


def _plan(tmp_path: Path, **kw: object):
    req = PlanRequest(curriculum=one_stage_curriculum(tmp_path), target_mem_gb=2.0, run="p",
                      runs_dir=tmp_path / "runs", **kw)  # type: ignore[arg-type]
    return make_plan(req, estimation_step)


def test_the_default_profile_with_a_gpu_makes_plan_plan_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("planning from a GPU-less machine")
    site = tmp_path / "site.yaml"  # a site's profile, given as a file
    site.write_text("name: site\nexecutor: slurm\npartition: gpu\ngpus_per_node: 1\ngpu_mem_gb: 40\n")
    monkeypatch.setenv("ORCHESTRATOR_CLUSTER", str(site))
    plan = _plan(tmp_path)
    assert plan.device == "cuda" and plan.cluster.name == "site"
    assert "profile site has 1 per node" in plan.assumptions.device_source
    assert plan.assumptions.cluster.chosen_by == "$ORCHESTRATOR_CLUSTER"


def test_the_device_follows_the_flag_the_profile_and_the_user_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpu = ProbeRecord(host_available_gb=16.0)

    def choose(device: str = "auto", cluster: str | None = None) -> str:
        req = PlanRequest(curriculum=TINY_CURRICULUM, target_mem_gb=20.0, device=device)  # type: ignore[arg-type]
        return plan_file.choose_budget(req, no_gpu, resolve_cluster(cluster)[0]).device

    assert choose() == "cpu"  # the built-in default profile (local) has no GPU
    cfg = tmp_path / "config.yaml"
    cfg.write_text("cluster: generic-slurm\n")
    monkeypatch.setenv("ORCHESTRATOR_CONFIG", str(cfg))
    assert default_cluster() == ("generic-slurm", str(cfg))
    assert choose() == "cuda"
    assert choose(device="cpu") == "cpu"  # the flag refuses it
    assert choose(cluster="local") == "cpu"  # --cluster wins over the default
    monkeypatch.setenv("ORCHESTRATOR_CLUSTER", "local")  # the env wins over the file
    assert choose() == "cpu" and default_cluster() == ("local", "$ORCHESTRATOR_CLUSTER")


def test_a_bad_user_config_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("clustre: generic-slurm\n")
    monkeypatch.setenv("ORCHESTRATOR_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match=rf"{cfg}: unknown key 'clustre' \(did you mean 'cluster'\?\)"):
        default_cluster()
    monkeypatch.setenv("ORCHESTRATOR_CLUSTER", "nonesuch")  # the env wins, and is checked
    with pytest.raises(ConfigError, match="no profile 'nonesuch'"):
        resolve_cluster(None)


def test_cpu_plan_notice_names_the_flag_only_where_slurm_answers(tmp_path: Path) -> None:
    req = PlanRequest(curriculum=TINY_CURRICULUM)
    cpu = plan_file.DeviceChoice("cpu", 2.0, "--target-mem",
                                 "no GPU here, and cluster profile local has none")
    text = cpu_plan_notice(req, cpu, "the default", lambda: True)
    assert text is not None and text.startswith("planning for this machine's CPU")
    assert "--cluster NAME" in text and "ORCHESTRATOR_CLUSTER" in text and "--device cuda" in text
    assert cpu_plan_notice(req, cpu, "the default", lambda: False) is None
    asked_cpu = PlanRequest(curriculum=TINY_CURRICULUM, device="cpu")
    assert cpu_plan_notice(asked_cpu, cpu, "the default", lambda: True) is None


@pytest.mark.slurm
def test_plan_on_a_slurm_machine_says_first_that_it_plans_for_the_cpu(tmp_path: Path) -> None:
    """The real local SLURM answers `sinfo`; the default profile (local) has no GPU."""
    if torch.cuda.is_available():
        pytest.skip("planning from a GPU-less machine")
    assert slurm_answers()
    cur = str(one_stage_curriculum(tmp_path))
    res = CliRunner().invoke(app, ["plan", "--target-mem", "2", "--curriculum", cur, "--run", "n",
                                   "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert res.exit_code == 0, res.output
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("note: planning for this machine's CPU"), res.stderr
    assert "--cluster NAME" in " ".join(res.stderr.split())
