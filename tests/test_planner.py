"""The planner: the estimate counts what a real step allocates; the plan fits and is tight."""
from __future__ import annotations

from itertools import accumulate
from pathlib import Path

import pytest
import torch
from conftest import replaced
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config import load_curriculum
from orchestrator.errors import PlanError
from orchestrator.planning import estimator, planner, pool
from orchestrator.planning.estimator import (
    Budget,
    Candidate,
    StageEstimator,
    build_stage_model,
    surely_live_bytes,
)
from orchestrator.planning.memory import (
    DEFAULT_OVERHEADS,
    SLIDING_WINDOW,
    FakeStep,
    LivePeak,
    estimate_eval_peak,
    estimate_step_peak,
    make_optimizer,
    prime_adamw,
)
from orchestrator.planning.planner import candidate_ladder, plan_stage
from orchestrator.planning.search import first_below, first_fit
from orchestrator.training.step import estimation_step

REPO = Path(__file__).resolve().parent.parent
# what validation slides over in these tests: a small volume, so that the searches below
# are about the training step (test_validation_* cover the volume's part)
VOL = (64, 64, 64)


def _budget(gb: float) -> Budget:
    return Budget(gb, DEFAULT_OVERHEADS["cpu"], cuda_target=False, val_volume_vox=VOL)


@pytest.fixture(scope="module")
def stage1():
    _cur, stages = load_curriculum(REPO / "tests" / "data" / "tiny.yaml")
    return stages[0][0]


def test_fake_estimate_equals_live_bytes_of_a_real_step(stage1) -> None:
    """Same tracker on real tensors: the fake run must see the same storages (±1 %)."""
    step = estimation_step(stage1, amp=False)
    fake = estimate_step_peak(lambda: build_stage_model(stage1, 4, False), (2, 1, 32, 32, 32),
                              (2, 32, 32, 32), step, cuda_target=False).tensor_bytes
    torch.manual_seed(0)
    with LivePeak() as tracker:
        model = build_stage_model(stage1, 4, False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 2, (2, 32, 32, 32))
        for _ in range(2):
            step(model, opt, x, y)
    assert fake == pytest.approx(tracker.peak, rel=0.01)


def test_frozen_encoder_is_estimated_as_the_trainer_fine_tunes(stage1) -> None:
    """`freeze: encoder`: no weight gradients, no AdamW state, no saved encoder activations;
    the estimate still equals the live bytes of a real fine-tuning step, and is lower."""
    frozen = stage1.model_copy(update={"freeze": "encoder"})
    step = estimation_step(frozen, amp=False)
    shapes = (2, 1, 32, 32, 32), (2, 32, 32, 32)
    est = {spec.freeze: estimate_step_peak(lambda s=spec: build_stage_model(s, 4, False), *shapes,
                                           step, cuda_target=False).tensor_bytes
           for spec in (stage1, frozen)}
    torch.manual_seed(0)
    with LivePeak() as tracker:
        model = build_stage_model(frozen, 4, False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert 0 < len(trainable) < len(list(model.parameters()))
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        x, y = torch.randn(*shapes[0]), torch.randint(0, 2, shapes[1])
        for _ in range(2):
            step(model, opt, x, y)
    assert est["encoder"] == pytest.approx(tracker.peak, rel=0.01)
    assert est["encoder"] < 0.9 * est[None]


def test_estimate_grows_with_batch_and_shrinks_with_checkpointing(stage1) -> None:
    step = estimation_step(stage1, amp=True)
    est = lambda bs, ck: estimate_step_peak(  # noqa: E731
        lambda: build_stage_model(stage1, 8, ck), (bs, 1, 64, 64, 64), (bs, 64, 64, 64), step,
        cuda_target=False).tensor_bytes
    assert est(2, False) > est(1, False)
    assert est(2, True) < est(2, False)


def _ranged(spec, **planner):
    return spec.model_copy(update={"planner": spec.planner.model_copy(update=planner)})


@pytest.fixture(scope="module")
def stage1_64(stage1):
    """Stage 1 at 64^3 with 8 base filters: room for checkpointing, 4 filters, 48^3..32^3."""
    return _ranged(stage1.model_copy(update={"input_size_vox": (64, 64, 64), "base_filters": 8}),
                   max_batch_size=8)


@pytest.mark.parametrize("budget_gb", [0.6, 0.7, 0.9])  # shrunk input; 4 filters; batch 3
def test_chosen_configuration_fits_and_the_next_larger_does_not(stage1_64, budget_gb) -> None:
    """The property of the search: the chosen rung at the chosen batch fits; one more
    sample does not (unless at max_batch_size); the rung before it does not at min batch."""
    budget = _budget(budget_gb)
    sp = plan_stage(stage1_64, None, budget, estimation_step)
    assert sp.predicted_gb <= budget_gb
    est = StageEstimator(stage1_64, budget, estimation_step, 16)
    ladder = candidate_ladder(stage1_64, 16)
    i = ladder.index(Candidate(tuple(sp.input_size_vox), sp.base_filters, sp.checkpointing))
    assert est.gb(ladder[i], sp.batch_size) == pytest.approx(sp.predicted_gb, abs=1e-4)
    if sp.batch_size < stage1_64.planner.max_batch_size:
        assert not est.fits(ladder[i], sp.batch_size + 1), "one more sample would have fitted"
    if i > 0:
        assert not est.fits(ladder[i - 1], stage1_64.planner.min_batch_size), \
            f"{ladder[i - 1].describe()} would have fitted"
        assert "needs" in sp.reasons[0] and f"> {budget_gb:g} GB" in sp.reasons[0]


def test_ladder_orders_checkpointing_filters_then_input(stage1_64) -> None:
    ladder = candidate_ladder(stage1_64, 16)
    assert [c.describe() for c in ladder[:4]] == [
        "64x64x64, base filters 8, no checkpointing", "64x64x64, base filters 8, checkpointing",
        "64x64x64, base filters 4, checkpointing", "48x64x64, base filters 4, checkpointing"]
    assert ladder[-1].input_size_vox == (32, 32, 32)
    assert len(ladder) == 3 + 6  # 64^3 -> 32^3, one side at a time


def test_first_fit_bisects_and_never_skips_the_boundary() -> None:
    for n in (1, 2, 5, 29):
        for boundary in range(n + 1):
            seen: list[int] = []

            def fits(k: int, b: int = boundary, seen: list[int] = seen) -> bool:
                seen.append(k)
                return k >= b
            got = first_fit(n, fits)
            assert got == (boundary if boundary < n else None)
            assert len(seen) <= 2 * max(1, n).bit_length() + 1


@given(st.lists(st.floats(0.05, 50.0), min_size=1, max_size=40), st.floats(0.01, 60.0),
       st.floats(0.3, 3.0))
@settings(max_examples=300, deadline=None)
def test_first_below_finds_the_boundary_with_few_estimates(steps, target, curvature) -> None:
    """Any falling ladder (values need not be proportional to the sizes): the first rung
    under the target, with the rung before it estimated; few estimates on long ladders."""
    values = list(accumulate(reversed(steps)))[::-1]  # strictly falling
    sizes = [v ** curvature for v in values]  # falling, but not in proportion
    seen: list[int] = []

    def value(k: int) -> float:
        seen.append(k)
        return values[k]

    got = first_below(value, target, sizes)
    want = next((k for k, v in enumerate(values) if v <= target), None)
    assert got == want
    if got is not None and got > 0:
        assert got - 1 in seen  # the rung before was estimated and did not fit
    assert len(seen) == len(set(seen))  # no rung estimated twice
    assert len(seen) <= 2 + 2 * max(1, len(values)).bit_length() + 1
    if values[0] > target:  # rung 0 known not to fit: the same search, without rung 0
        rest: list[int] = []
        assert first_below(lambda k: rest.append(k) or values[k], target, sizes,
                           rung0_over=True) == want
        assert rest == [k for k in seen if k != 0]


@pytest.mark.parametrize(("freeze", "amp", "checkpointing"),
                         [(None, False, False), (None, True, False), ("encoder", True, False),
                          (None, True, True)])
def test_surely_live_bytes_bound_the_estimate(stage1, freeze, amp, checkpointing) -> None:
    """The bound that lets the search skip rung 0 never exceeds the estimate it stands for
    (a fifth of it or more on a U-Net without checkpointing: it must be able to say
    'over'); with checkpointing the planner does not use it."""
    spec = stage1.model_copy(update={"freeze": freeze, "amp": amp})
    shapes = (2, 1, 48, 48, 48), (2, 48, 48, 48)

    def build() -> torch.nn.Module:
        return build_stage_model(spec, 8, checkpointing)
    peak = estimate_step_peak(build, *shapes, estimation_step(spec, amp), cuda_target=False)
    low = surely_live_bytes(build, *shapes, amp)
    assert 0 < low <= peak.tensor_bytes
    if not checkpointing:
        assert low > 0.2 * peak.tensor_bytes
    cand = Candidate((48, 48, 48), 8, checkpointing)
    est = StageEstimator(spec, _budget(0.01), estimation_step, 8)
    assert est.surely_over(cand, 2) is not checkpointing  # nothing fits 10 MB
    assert not StageEstimator(spec, _budget(100), estimation_step, 8).surely_over(cand, 2)


def test_first_below_on_a_proportional_ladder_needs_about_four_estimates() -> None:
    """Where values follow the sizes (what the planner's ladders do, roughly), the secant
    lands on the boundary: rungs 0 and 1, the guess, the rung before it."""
    sizes = [100.0, 100.0] + [float(s) for s in range(90, 0, -5)]
    values = [3.0 * 100 + 5] + [0.5 + 0.05 * s for s in sizes[1:]]
    for target in (4.0, 3.0, 2.0, 1.0):
        seen: list[int] = []
        got = first_below(lambda k, seen=seen: seen.append(k) or values[k], target, sizes)
        assert got == next(k for k, v in enumerate(values) if v <= target)
        assert len(seen) <= 4, (target, seen)


def _mlp_step(model, opt, x, y) -> None:  # noqa: ANN001
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _mlp() -> torch.nn.Module:  # 4M parameters, tiny activations: the optimizer's peak
    return torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2))


def _step_case(stage1, where: str, size: tuple[int, int, int], filters: int):  # noqa: ANN202
    """(step, model builder, shapes by batch) of a U-Net whose forward/backward holds the
    peak, or of an MLP whose optimizer step does."""
    if where == "optimizer step":
        return _mlp_step, _mlp, lambda bs: ((bs, 2048), (bs,))
    return (estimation_step(stage1, amp=False),
            lambda: build_stage_model(stage1, filters, False, size),
            lambda bs: ((bs, 1, *size), (bs, *size)))


@pytest.mark.parametrize("where", ["forward/backward", "optimizer step"])
def test_a_kept_session_estimates_other_batches_as_a_fresh_one(stage1, where) -> None:
    """The batch search reuses one fake model and measures the optimizer step's rise once:
    later batches give the bytes a fresh model gives, whether forward/backward (a U-Net)
    or the optimizer step (many parameters, tiny activations) holds the peak."""
    step, build, shapes = _step_case(stage1, where, (32, 32, 32), 4)
    kept = FakeStep(build, cuda_target=True)
    for bs in (2, 3, 5):
        fresh = estimate_step_peak(build, *shapes(bs), step, cuda_target=True).tensor_bytes
        assert kept.peak(*shapes(bs), step) == fresh, bs
    assert kept.opt_rise is not None and kept.opt_rise > 0
    rise, kept.opt_rise = kept.opt_rise, 0  # what the peak would be without the step's rise
    without = kept.peak(*shapes(5), step)
    assert (without < fresh) == (where == "optimizer step")
    kept.opt_rise = rise


@pytest.mark.parametrize("where", ["forward/backward", "optimizer step"])
def test_the_batch_bound_never_exceeds_the_step_it_stands_for(stage1, where) -> None:
    """From one batch's step, `batch_free_bytes` bounds every larger batch's peak from
    below, whether activations (a U-Net) or the optimizer step (many parameters, tiny
    activations) hold the peak; on the U-Net, at one sample more, it is close enough to
    say 'over'."""
    # a 48^3 U-Net: activations above the batch-free slack
    step, build, shapes = _step_case(stage1, where, (48, 48, 48), 8)
    session = FakeStep(build, cuda_target=False)
    at2 = session.peak(*shapes(2), step)
    free = session.batch_free_bytes()
    for bs in (3, 5):
        low = at2 + max(0, at2 - free) * (bs - 2) / 2
        exact = session.peak(*shapes(bs), step)
        assert low <= exact, bs
        if where == "forward/backward" and bs == 3:  # the one sample more the planner asks
            assert low > 0.75 * exact


def test_a_batch_over_by_the_bound_is_not_estimated(stage1) -> None:
    """Where the bound from the minimum batch already puts one sample more over the
    budget, the batch search stops there without estimating it, and says so."""
    spec = stage1.model_copy(update={"input_size_vox": (48, 48, 48)})
    cand = Candidate((48, 48, 48), 8, False)
    est = StageEstimator(spec, _budget(100), estimation_step, 8)
    at2 = est.gb(cand, 2)
    low, src = est.train_gb_at_least(cand, 3)
    assert src == 2 and at2 < low
    assert est.train_gb_at_least(Candidate((48, 48, 48), 8, True), 3) is None  # not estimated
    before = estimator.estimates_run()
    target = (at2 + low) / 2
    assert planner._grow_batch(est, cand, 2, 4, target) == (
        2, f"batch 3 needs at least {low:.2f} GB (batch 2's step, its activations grown in "
           "proportion)")
    assert estimator.estimates_run() == before and not est.estimated(cand, 3)
    assert est.gb(cand, 3) >= low  # and the bound was right to stop


def test_tight_budget_turns_on_checkpointing_then_shrinks(stage1) -> None:
    spec = stage1.model_copy(update={"input_size_vox": (96, 96, 96), "base_filters": 8})
    roomy = plan_stage(spec, None, _budget(50.0), estimation_step)
    assert not roomy.checkpointing and roomy.input_size_vox == (96, 96, 96)
    no_ckpt_gb = roomy.predicted_gb if roomy.batch_size == 2 else None
    tight_gb = 0.6 + 0.5 * ((no_ckpt_gb or 1.0) - 0.6)
    tight = plan_stage(spec, None, _budget(tight_gb), estimation_step)
    assert tight.checkpointing or tuple(tight.input_size_vox) != (96, 96, 96)
    assert tight.predicted_gb <= tight_gb
    assert any("checkpointing" in r for r in tight.reasons)


def test_nothing_fits_names_smallest_budget(stage1) -> None:
    want = (r"nothing fits in 0\.05 GB for stage1_basic_cnn; the smallest configuration of "
            r"stage1_basic_cnn \(32x32x32, base filters 4, checkpointing, batch 2\) needs "
            r"([0-9.]+) GB: use --target-mem ([0-9.]+) or more")
    with pytest.raises(PlanError, match=want) as info:
        plan_stage(stage1, None, _budget(0.05), estimation_step)
    import re

    suggested = float(re.search(want, str(info.value)).group(2))
    sp = plan_stage(stage1, None, _budget(suggested), estimation_step)
    assert sp.predicted_gb <= suggested  # the budget named is enough


def test_tighter_budget_changes_stage4_and_says_why() -> None:
    """What `--target-mem 6` does to the real stage 4, at test scale: the curriculum values
    at a roomy budget; checkpointing, with the need that forced it, at a tight one."""
    _cur, stages = load_curriculum(REPO / "tests" / "data" / "tiny.yaml")
    stage4 = stages[3][0]
    roomy = plan_stage(stage4, None, _budget(20.0), estimation_step)
    assert not roomy.checkpointing and roomy.reasons[0].startswith("curriculum values")
    need = roomy.predicted_gb  # batch 2 = the stage's min and max
    est = StageEstimator(stage4, _budget(need), estimation_step, 16)
    with_ckpt = est.gb(Candidate((32, 32, 32), 4, True), 2)
    tight_gb = round((need + with_ckpt) / 2, 4)
    tight = plan_stage(stage4, None, _budget(tight_gb), estimation_step)
    assert tight.checkpointing and tight.predicted_gb <= tight_gb
    assert tight.reasons[0] == (f"gradient checkpointing on: {with_ckpt:.2f} GB at batch 2; "
                                f"32x32x32, base filters 4, no checkpointing needs {need:.2f} GB "
                                f"at batch 2 > {tight_gb:g} GB")


def test_cli_nothing_fits_exits_2_naming_the_smallest_budget(tmp_path) -> None:
    import os
    import re
    import subprocess
    import sys

    # the tiny curriculum without stages 2-4 (planning them to their smallest takes 25 s)
    tiny = replaced((REPO / "tests" / "data" / "tiny.yaml").read_text(), "../../", f"{REPO}/")
    curriculum = tmp_path / "stage1_and_lcnn.yaml"
    curriculum.write_text("\n".join(line for line in tiny.splitlines()  # their files, overrides
                                    if not re.search(r"stage[234]_|cardinality", line)))
    res = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "--device", "cpu",
                          "--target-mem", "0.05", "--curriculum", str(curriculum),
                          "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "ORCHESTRATOR_CALIBRATION": "off"})
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert re.fullmatch(r"error: nothing fits in 0\.05 GB for stage1_basic_cnn, lcnn; the "
                        r"smallest configuration of "
                        r"lcnn \(64x64, base filters 8, checkpointing, batch 2\) needs [0-9.]+ GB: "
                        r"use --target-mem [0-9.]+ or more", line), line
    assert not (tmp_path / "runs").exists()  # nothing written


def test_validation_estimate_equals_live_bytes_of_a_real_sliding_window(stage1) -> None:
    """The fake two-window run plus the volume-sized buffers = the live bytes of validating
    a real volume (parameters and optimizer state held, as between epochs)."""
    from monai.inferers import sliding_window_inference

    roi, vol = (32, 32, 32), (100, 90, 88)  # 4 x 4 x 4 windows: the estimate cuts to 3 per axis

    def build() -> torch.nn.Module:
        return build_stage_model(stage1, 4, False, roi)
    est = estimate_eval_peak(build, roi, vol, 1, None, cuda_target=False)
    with LivePeak() as tracker, torch.no_grad():
        model = build().eval()
        opt = make_optimizer(model.parameters(), False)
        prime_adamw(opt)  # held through validation, as the trainer's
        x = torch.randn(1, 1, *vol)
        out = sliding_window_inference(x, roi, predictor=model, **SLIDING_WINDOW)
        out.argmax(1)
        del opt
    assert est.tensor_bytes == pytest.approx(tracker.peak, rel=0.01)  # equal here


def test_validation_of_a_large_volume_can_be_the_stage_peak(stage1) -> None:
    """A small window over ATLAS's volume: the volume-sized buffers outweigh the step."""
    spec = stage1.model_copy(update={"input_size_vox": (32, 32, 32), "base_filters": 4})
    small = plan_stage(spec, None, _budget(20.0), estimation_step)
    atlas = plan_stage(spec, None, Budget(20.0, DEFAULT_OVERHEADS["cpu"], False), estimation_step)
    assert small.val_gb < small.train_gb == small.predicted_gb
    assert atlas.train_gb == pytest.approx(small.train_gb)
    assert atlas.val_gb > atlas.train_gb and atlas.predicted_gb == atlas.val_gb
    assert any("over a 197x233x189 volume" in r and "the stage's peak" in r for r in atlas.reasons)
    # a budget below what validating that volume needs fits nothing, and says what does
    with pytest.raises(PlanError, match=r"needs ([0-9.]+) GB: use --target-mem"):
        plan_stage(spec, None, Budget(atlas.val_gb * 0.9, DEFAULT_OVERHEADS["cpu"], False),
                   estimation_step)


def test_sessions_with_the_same_parameters_share_the_optimizer_steps_rise(stage1) -> None:
    """A session whose optimizer holds the same parameters as an earlier one (the same
    filters with checkpointing; a CNN at another input size) takes that session's rise
    instead of running the optimizer step, and estimates the peak a fresh session does;
    other filters measure their own."""
    rises: dict[tuple, int] = {}
    size = (32, 32, 32)
    step = estimation_step(stage1, amp=False)
    x, y = (2, 1, *size), (2, *size)

    def build(filters: int, ckpt: bool, vox: tuple[int, ...] = size):
        return lambda: build_stage_model(stage1, filters, ckpt, vox)

    first = FakeStep(build(4, False), cuda_target=True, rises=rises)
    assert first.opt_rise is None
    first.peak(x, y, step)
    assert first.opt_rise is not None and len(rises) == 1
    for ckpt, vox in ((True, size), (False, (48, 32, 32))):
        twin = FakeStep(build(4, ckpt, vox), cuda_target=True, rises=rises)
        assert twin.opt_rise == first.opt_rise  # taken, not measured
        fresh = FakeStep(build(4, ckpt, vox), cuda_target=True)
        shapes = ((2, 1, *vox), (2, *vox))
        assert twin.peak(*shapes, step) == fresh.peak(*shapes, step)
    wider = FakeStep(build(8, False), cuda_target=True, rises=rises)
    assert wider.opt_rise is None
    wider.peak(x, y, step)
    assert len(rises) == 2 and rises[wider._rise_key] > first.opt_rise


def test_a_job_sent_with_the_parents_estimates_runs_none_again(stage1) -> None:
    """A worker forked before another worker's estimates came back gets them with its job
    (planning/pool.py): planning the same stage again then runs no estimate and gives the
    same plan."""
    args = (stage1, None, _budget(0.9), estimation_step, None, 0)
    estimator.clear_estimate_cache()
    first, ran = pool._run(*args)
    assert isinstance(first, planner.StagePlan) and ran
    estimator.clear_estimate_cache()  # what a worker forked earlier knows
    again, ran_again = pool._run_knowing(ran, *args)
    assert again == first and ran_again == {}
    estimator.clear_estimate_cache()
