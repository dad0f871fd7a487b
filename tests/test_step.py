"""One training step for every caller and device (issue 12): the trainer, the planner's
estimate, `plan --verify`'s trial and `bench step` all run `TrainStep`, and the trial's
code is the GPU's with only the device changed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_plans import quick_tiny_plan

from orchestrator.config import load_plan
from orchestrator.planning.memory import estimate_step_peak
from orchestrator.planning.planner import _shapes, build_stage_model
from orchestrator.training import step as step_mod
from orchestrator.training import trial as trial_mod
from orchestrator.training.step import StepResult, TrainStep, estimation_step
from orchestrator.training.trainer import run_stage

S1 = "stage1_basic_cnn"


@pytest.fixture
def step_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every TrainStep call, by the device type it ran for."""
    calls: list[str] = []
    real = TrainStep.__call__

    def counted(self: TrainStep, *args, **kwargs) -> StepResult:
        calls.append(self.device_type)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", counted)
    return calls


def test_trainer_trial_and_estimate_run_the_one_step(tmp_path: Path, tiny_data: Path,
                                                     step_calls: list[str]) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data)
    sp = plan.stage(S1)
    assert sp.spec.boundary_weight_end > 0  # the boundary term needs the batch's maps

    run_stage(path, S1, max_steps=1)
    assert step_calls == ["cpu"], "the trainer's step is TrainStep"

    trial_mod.trial(path, S1, steps=2)
    assert step_calls[1:] == ["cpu", "cpu"], "the trial's step is TrainStep"

    step = estimation_step(sp.spec, amp=False)
    x_shape, y_shape = _shapes(sp.spec, sp.input_size_vox, 2)
    est = estimate_step_peak(lambda: build_stage_model(sp.spec, 4, False, sp.input_size_vox),
                             x_shape, y_shape, step, cuda_target=False)
    assert est.tensor_bytes > 0 and step_calls[3:] == ["cpu"], "the estimate's step is TrainStep"


def test_bench_step_times_the_one_step(tmp_path: Path, step_calls: list[str]) -> None:
    from orchestrator.cli.bench.step import bench_step

    doc = bench_step(input_vox=32, batch_size=2, steps=1, blocks=1, tmp_dir=tmp_path)
    # warm-up 2 + 1 block, each for the trainer and TrainStep alone
    assert len(step_calls) == 6
    figs = doc["figures"]
    assert figs["train_step_s"] > 0 and figs["trainer_step_s"] > 0 and figs["bare_step_s"] > 0


def test_trial_of_a_gpu_plan_runs_its_gpu_code_on_the_cpu(tmp_path: Path, tiny_data: Path,
                                                          step_calls: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan for CUDA, its trial with only the device changed: the same function, the same
    step (with the boundary term's distance maps: the GPU branch once forgot them), and
    the GPU's synchronisation asked for."""
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data)
    gpu_plan = plan.model_copy(update={"device": "cuda"})
    from orchestrator.config import plan_to_yaml

    path.write_text(plan_to_yaml(gpu_plan))
    assert load_plan(path).device == "cuda"
    made: list[TrainStep] = []
    real_for_stage = TrainStep.for_stage.__func__  # type: ignore[attr-defined]

    def recording(cls, *args, **kwargs):  # noqa: ANN001, ANN202
        made.append(real_for_stage(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(TrainStep, "for_stage", classmethod(recording))
    result = trial_mod.trial(path, S1, steps=2, device="cpu")
    assert result["step_s"] > 0 and result["tensor_peak_gb"] > 0
    (step,) = made
    assert step.synchronize and step.needs_sdm and step.device_type == "cpu"
    assert step_calls == ["cpu", "cpu"]


def _toy() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 3), torch.zeros(4).long()


def _ce(model, x, y, amp_dtype, device_type, epoch, sdm=None):  # noqa: ANN001, ANN202
    return torch.nn.functional.cross_entropy(model(x), y)


def test_a_non_finite_loss_or_gradient_skips_the_step() -> None:
    model, opt, x, y = _toy()
    before = [p.detach().clone() for p in model.parameters()]
    nan_loss = TrainStep(lambda *a, **k: _ce(*a, **k) * float("nan"), "cpu", None)
    assert nan_loss(model, opt, x, y).skipped == "loss"
    x_inf = x.clone()
    x_inf[0, 0] = float("inf")  # finite loss? no: inf input makes the loss non-finite too
    assert TrainStep(_ce, "cpu", None)(model, opt, x_inf, y).skipped == "loss"
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in model.parameters())
    applied = TrainStep(_ce, "cpu", None)(model, opt, x, y)
    assert applied.skipped is None and torch.isfinite(applied.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_micro_batches_give_the_whole_batch_step() -> None:
    """The accumulation the OOM fallback switches on changes memory, not the step."""
    model_a, opt_a, x, y = _toy()
    model_b, opt_b, _, _ = _toy()
    TrainStep(_ce, "cpu", None)(model_a, opt_a, x, y)
    TrainStep(_ce, "cpu", None, micro=2)(model_b, opt_b, x, y)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_amp_dtype_and_scaler_follow_the_device() -> None:
    cpu = TrainStep(_ce, "cpu", step_mod.amp_dtype_for("cpu", True))
    assert cpu.amp_dtype == torch.bfloat16 and not cpu.scaler.is_enabled()
    fp16 = TrainStep(_ce, "cpu", torch.float16)  # what a GPU without bf16 gets
    assert fp16.scaler.is_enabled()


def test_a_stage_can_ask_for_fp16_and_a_bad_dtype_is_one_line(tmp_path: Path, tiny_data: Path) -> None:
    from orchestrator.config import load_stage
    from orchestrator.errors import ConfigError

    plan, _ = quick_tiny_plan(tmp_path / "runs", tiny_data, stage_updates={"amp_dtype": "fp16"})
    step = TrainStep.for_stage(plan.stage(S1).spec, "cpu", amp=True)
    assert step.amp_dtype == torch.float16 and step.scaler.is_enabled()
    assert TrainStep.for_stage(plan.stage(S1).spec, "cpu", amp=False).amp_dtype is None
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(__file__).parent.parent / "stages" / "stage1_basic_cnn.yaml").read_text()
                   + "\namp_dtype: fp8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: amp_dtype: .*'auto', 'bf16' or 'fp16'"):
        load_stage(bad)
