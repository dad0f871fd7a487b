"""`orchestrator bench gpu`: the whole command at its quick sizes on the CPU, and on a GPU
(marker `gpu`) the full bench with its acceptance checks as tests.

The CPU run goes through every section's code with the device as the only difference
(the out-of-memory section says why it cannot run on a CPU); the GPU tests share one run
of the full bench (about 6 minutes on an H200) and check what issue 12 asks of it.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app, main
from orchestrator.cli.bench.gpu import bench_gpu, failed, section_lines
from orchestrator.cli.bench.gpu_plan import nvml_figures
from orchestrator.cli.bench.gpu_run import FULL, GpuBench, Skipped
from orchestrator.planning.nvml import NvmlSampler, Segment, gpu_info, process_used_gb

SECTIONS = ["plan", "verify", "step", "fp16", "oom", "loader"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers without a GPU")


def _check_document(doc: dict, device: str) -> None:
    """Every section produced its figures (finite numbers) or says why it did not run."""
    assert doc["bench"] == "gpu" and doc["device"] == device
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["device"] == device
    assert list(doc["sections"]) == SECTIONS
    assert doc["finished"] and doc["seconds"] > 0
    for name, section in doc["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        assert section["seconds"] >= 0
        if section["status"] == "skipped":
            assert section["reason"], name
            continue
        assert section["figures"], f"{name}: ok without figures"
        for fig in section["figures"]:
            assert math.isfinite(doc["figures"][fig]), (name, fig)
    stages = [s["name"] for s in doc["sections"]["plan"]["plans"]["20gb"]["stages"]]
    own = doc["sections"]["plan"]["plans"]["own"]
    assert [s["name"] for s in own["stages"]] == stages and own["budget_gb"] > 0
    assert doc["figures"]["plan_20gb_budget_gb"] == 20
    for stage in stages:
        key = f"verify_{stage}"
        assert doc["figures"][f"{key}_measured_gb"] > 0
        assert doc["figures"][f"{key}_ratio"] == pytest.approx(1.0, abs=0.25), key
        step_s = doc["figures"][f"step_{stage}_s"]
        batch = doc["sections"]["step"]["stages"][stage]["batch_size"]
        assert step_s > 0
        assert doc["figures"][f"step_{stage}_samples_per_s"] == pytest.approx(batch / step_s, rel=1e-3)
    fp16 = doc["sections"]["fp16"]
    assert fp16["amp_dtype"] == "torch.float16" and fp16["device"].startswith(device)
    assert doc["figures"]["fp16_finite_loss_steps"] == doc["figures"]["fp16_steps"] > 0
    assert doc["figures"]["fp16_scale"] > 0
    f = doc["figures"]
    assert f["loader_samples_per_s"] > 0 and f["epoch_samples_per_s"] > 0
    assert f["loader_vs_gpu_ratio"] == pytest.approx(f["loader_samples_per_s"] / f["gpu_samples_per_s"],
                                                      rel=1e-3)


@pytest.mark.slow
def test_bench_gpu_quick_on_the_cpu_measures_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench-gpu.json"
    res = CliRunner().invoke(app, ["bench", "gpu", "--device", "cpu", "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # stdout holds the document and nothing else
    assert json.loads(out.read_text()) == doc
    _check_document(doc, "cpu")
    assert doc["quick"] is True
    oom = doc["sections"]["oom"]  # skipped, after the same run under its budget
    assert oom["status"] == "skipped" and oom["reason"].startswith("needs CUDA")
    assert "did 2 of 2 steps" in oom["reason"] and "with 0 fallbacks" in oom["reason"]
    assert doc["figures"]["verify_stage1_basic_cnn_tensor_ratio"] == pytest.approx(1.0, abs=0.05)
    assert doc["figures"]["fp16_steps"] == 2 and doc["figures"]["epoch_steps"] == 3
    assert doc["data"]["shape_vox"] == [24, 24, 24]
    for line in ("1/6 plan", "6/6 loader", "done"):  # progress on stderr as it went
        assert line in res.stderr


def test_a_failing_section_is_recorded_written_and_the_next_runs(tmp_path: Path) -> None:
    out = tmp_path / "doc.json"
    lines: list[str] = []
    b = GpuBench("cpu", FULL, tmp_path, out, lines.append)

    def broken(_: GpuBench) -> dict:
        raise ValueError("no such kernel\nsecond line")

    def skipped(_: GpuBench) -> dict:
        raise Skipped("not here")

    b.run(1, "broken", "fails", broken)
    on_disk = json.loads(out.read_text())  # written after each section
    assert on_disk["sections"]["broken"]["status"] == "error"
    assert on_disk["sections"]["broken"]["error"].startswith("ValueError: no such kernel (tests/")
    b.run(2, "skipped", "cannot run", skipped)
    b.run(3, "fine", "works", lambda _: {"figures": {"x_s": 1.23456789}, "errors": {}})
    b.run(4, "partly", "one part fails", lambda _: {"figures": {"y": 2}, "errors": {"a": "bad"}})
    doc = json.loads(out.read_text())
    assert [s["status"] for s in doc["sections"].values()] == ["error", "skipped", "ok", "error"]
    assert doc["sections"]["skipped"]["reason"] == "not here"
    assert doc["figures"] == {"x_s": 1.23457, "y": 2.0}  # 6 significant digits
    assert doc["sections"]["partly"]["errors"] == {"a": "bad"} and failed(doc)
    shown = section_lines(doc)  # what the table mode prints under the figures
    raised_at = f"tests/test_bench_gpu.py:{broken.__code__.co_firstlineno + 1}"
    assert shown[0].startswith("broken: error (") and shown[0].endswith(f"no such kernel ({raised_at})")
    assert shown[1].endswith("not here") and shown[2].startswith("fine: ok (")
    assert any("Traceback" in line for line in lines)  # the whole traceback on stderr


@pytest.mark.parametrize("args, expected", [
    (["--device", "tpu"], "Invalid value for '--device': Value error, 'tpu' is not one of"),
    (["--device", "cpu", "--out", "/nonexistent/folder/x.json"], "--out: /nonexistent/folder/x.json"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["orchestrator", "bench", "gpu", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


@NO_GPU
def test_cuda_asked_without_a_gpu_is_exit_2(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["orchestrator", "bench", "gpu", "--device", "cuda"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "--device cuda: no CUDA device" in capsys.readouterr().err


def test_help_says_what_it_measures() -> None:
    res = CliRunner().invoke(app, ["bench", "gpu", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    for words in ("20 GB", "max_memory_reserved", "NVML", "bf16", "GradScaler", "memory_fallback",
                  "HDF5 cache", "--out", "--quick"):
        assert words in text, words


@NO_GPU
def test_nvml_helpers_answer_without_a_driver() -> None:
    used, how = process_used_gb(os.getpid())
    assert used is None and how
    assert "gpu_error" in gpu_info()
    with NvmlSampler() as sampler:
        sampler.mark("stage")
    assert sampler.error and sampler.segments == {}


def test_nvml_figures_take_the_trial_process_else_the_growth_of_the_gpu() -> None:
    seg = Segment(baseline_device_gb=1.0, peak_device_gb=4.5,
                  peak_process_gb={100: 0.6, 200: 3.2, 300: 0.1})  # 100: the bench itself
    nvml = seg.summary(exclude_pid=100)
    assert (nvml["process_pid"], nvml["process_peak_gb"], nvml["device_delta_gb"]) == (200, 3.2, 3.5)
    assert nvml_figures("verify_s", nvml, predicted_gb=4.0) == {"verify_s_nvml_gb": 3.2,
                                                                 "verify_s_nvml_ratio": 0.8}
    hidden = Segment(baseline_device_gb=1.0, peak_device_gb=4.5).summary(exclude_pid=100)  # PID namespace
    assert nvml_figures("v", hidden, 3.5) == {"v_nvml_gb": 3.5, "v_nvml_ratio": 1.0}
    assert hidden["compared"] == "device_delta_gb"


# ---------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def gpu_doc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One full run of the bench on CUDA (about 6 minutes on an H200)."""
    out = tmp_path_factory.mktemp("bench-gpu") / "bench-gpu.json"
    doc = bench_gpu(device="cuda", out=out)
    assert json.loads(out.read_text())["sections"].keys() == doc["sections"].keys()
    return doc


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_bench_every_section_within_8_minutes(gpu_doc: dict) -> None:
    _check_document(gpu_doc, "cuda")
    assert gpu_doc["quick"] is False and gpu_doc["machine"]["gpu_name"]
    assert all(s["status"] == "ok" for s in gpu_doc["sections"].values()), gpu_doc["sections"]
    assert gpu_doc["seconds"] <= 480


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_verify_within_25_percent_and_nvml_sees_the_trial(gpu_doc: dict) -> None:
    stages = gpu_doc["sections"]["verify"]["stages"]
    assert len(stages) == 5  # 4 stages + LCNN
    for name, m in stages.items():
        assert "error" not in m, (name, m)
        assert m["ratio"] == pytest.approx(1.0, abs=0.25), (name, m)
        assert m["method"].startswith("torch.cuda.max_memory_reserved")
        # the driver sees at least what the caching allocator reserved
        nvml_gb = gpu_doc["figures"][f"verify_{name}_nvml_gb"]
        assert nvml_gb >= m["reserved_gb"], (name, m)


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_steps_in_bf16_at_the_planned_size(gpu_doc: dict) -> None:
    for name, s in gpu_doc["sections"]["step"]["stages"].items():
        row = next(r for r in gpu_doc["sections"]["plan"]["plans"]["20gb"]["stages"] if r["name"] == name)
        assert s["input_size_vox"] == row["input_size_vox"] and s["batch_size"] == row["batch_size"]
        if row["amp"]:
            assert s["amp_dtype"] == "torch.bfloat16", name
        assert gpu_doc["figures"][f"step_{name}_mvox_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_out_of_memory_falls_back_and_completes(gpu_doc: dict) -> None:
    oom = gpu_doc["sections"]["oom"]
    assert oom["status"] == "ok", oom
    assert oom["memory_fallback"] and "out of memory" in oom["memory_fallback"][0]
    assert gpu_doc["figures"]["oom_steps_done"] == FULL.oom_steps


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_fp16_and_loader(gpu_doc: dict) -> None:
    assert gpu_doc["figures"]["fp16_steps"] == FULL.fp16_steps
    loader = gpu_doc["sections"]["loader"]
    assert loader["input_size_vox"] == [96, 96, 96] and loader["data"]["shape_vox"] == [197, 233, 189]
    assert gpu_doc["figures"]["loader_num_workers"] >= 1


@pytest.mark.gpu
def test_gpu_nvml_sees_this_process() -> None:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    used, how = process_used_gb(os.getpid())
    assert used is not None and used >= 0.25, how
    del x


class _Driver:
    """Stands in for pynvml's two handle look-ups: says which one was asked for."""

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:  # noqa: N802 -- pynvml's names
        return f"index {i}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802
        return f"uuid {uuid}"


@pytest.mark.parametrize("visible, cuda_index, expected", [
    (None, 0, "index 0"), ("3", 0, "index 3"), ("2,5", 1, "index 5"),
    ("GPU-8f1a,GPU-77", 1, "uuid GPU-77"), ("", 1, "index 1"),
])
def test_nvml_finds_the_gpu_cuda_means(visible, cuda_index, expected, monkeypatch) -> None:
    from orchestrator.planning.nvml import _handle

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert _handle(_Driver(), cuda_index) == expected
