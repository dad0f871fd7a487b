"""What the trainer optimises: the boundary term with its distance maps, gradient
accumulation, and fine-tuning from a checkpoint with the encoder frozen (issue 5)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CURRICULUM, replaced
from tiny_plans import quick_tiny_plan

from orchestrator.config import load_curriculum
from orchestrator.data import augment
from orchestrator.data.cache import build_cache
from orchestrator.data.dataset import PatchDataset
from orchestrator.data.distance import signed_distance_map
from orchestrator.data.sources import discover_subjects, load_subject
from orchestrator.errors import ConfigError
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.losses import BoundaryLoss
from orchestrator.training.parts import build_runner
from orchestrator.training.step import Objective
from orchestrator.training.trainer import run_stage

S1 = "stage1_basic_cnn"
PATCH = (16, 16, 16)


def test_patches_carry_the_whole_volume_distance_map(tiny_data: Path) -> None:
    recs = discover_subjects(tiny_data)
    ds = PatchDataset(recs, PATCH, samples_per_epoch=8, lesion_fraction=0.5, seed=3, with_sdm=True)
    full = {i: signed_distance_map(load_subject(r).label) for i, r in enumerate(recs)}
    for i in range(len(ds)):
        item, draw = ds[i], ds.patch_draw(i)
        box = tuple(slice(s, s + p) for s, p in zip(draw.start_vox, PATCH))
        assert item["sdm"].shape == (1, *PATCH) and item["sdm"].dtype == torch.float32
        np.testing.assert_array_equal(item["sdm"][0].numpy(), full[draw.subject_index][box])
    assert "sdm" not in PatchDataset(recs, PATCH, samples_per_epoch=1)[0]


@pytest.mark.parametrize("source", ["nifti", "cache"])
def test_augmented_maps_stay_aligned_with_labels(tiny_data: Path, tmp_path: Path, source: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Flips move image, label and distance map together: negative exactly on the lesion
    (the affine's two interpolations differ at the rim: tests/test_augment.py)."""
    monkeypatch.setattr(augment, "AFFINE_PROB", 0.0)
    recs = discover_subjects(tiny_data if source == "nifti" else build_cache(tiny_data, tmp_path).out)
    ds = PatchDataset(recs, PATCH, samples_per_epoch=12, lesion_fraction=1.0, seed=1,
                      augment=True, with_sdm=True)
    lesion_patches = 0
    for i in range(len(ds)):
        item = ds[i]
        lesion = item["label"].numpy() == 1
        lesion_patches += bool(lesion.any())
        sdm = item["sdm"][0].numpy()
        assert (sdm[lesion] < 0).all() and (sdm[~lesion] >= 0).all()
    assert lesion_patches == len(ds)  # lesion_fraction 1: every patch holds lesion voxels


def _tiny_model_out() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    main = torch.randn(2, 2, 8, 8, 8, generator=g)
    aux = torch.randn(2, 2, 4, 4, 4, generator=g)
    y = (torch.rand(2, 8, 8, 8, generator=g) > 0.7).long()
    sdm = torch.from_numpy(np.stack([signed_distance_map(m) for m in y.numpy()]))[:, None]
    return [main, aux], y, sdm


class _Fixed(torch.nn.Module):
    """A 'model' returning given deep-supervision outputs."""

    def __init__(self, outs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outs = outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.outs


def test_objective_moves_weight_from_regional_to_boundary() -> None:
    _, stages = load_curriculum(TINY_CURRICULUM)
    spec = stages[0][0].model_copy(update={"boundary_weight_start": 0.1, "boundary_weight_end": 0.5,
                                           "boundary_ramp_epochs": 4})
    outs, y, sdm = _tiny_model_out()
    obj = Objective(spec)
    assert obj.needs_sdm
    x = torch.zeros(2, 1, 8, 8, 8)
    regional = obj.seg_loss(outs, y.unsqueeze(1).float()).item()
    boundary = BoundaryLoss()(outs[0], sdm).item()  # on the full-resolution output only
    for epoch, a in ((0, 0.1), (2, 0.3), (4, 0.5), (9, 0.5)):
        got = obj(_Fixed(outs), x, y, None, "cpu", epoch, sdm=sdm).item()
        assert got == pytest.approx((1 - a) * regional + a * boundary, rel=1e-6)
    with pytest.raises(ValueError, match="signed distance maps"):
        obj(_Fixed(outs), x, y, None, "cpu", 0)
    off = Objective(spec.model_copy(update={"boundary_weight_start": 0.0, "boundary_weight_end": 0.0}))
    assert not off.needs_sdm
    assert off(_Fixed(outs), x, y, None, "cpu", 0).item() == pytest.approx(regional, rel=1e-6)


def _first_step_gradients(tmp_path: Path, data: Path, name: str, **stage: object) -> dict:
    """The gradients the optimizer's first step receives (after clipping)."""
    plan, _ = quick_tiny_plan(tmp_path / name, data, stage_updates=stage)
    runner = build_runner(plan, S1)
    runner.start()
    grads: dict[str, torch.Tensor] = {}
    runner.opt.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in runner.model.named_parameters() if p.grad is not None}))
    runner.train_steps(max_steps=1)
    assert runner.progress.global_step == 1 and grads
    return grads


def test_accumulated_step_equals_the_whole_batch(tmp_path: Path, tiny_data: Path) -> None:
    """batch 1 x 2 accumulated backward passes == batch 2 in one: same samples, same gradient.

    Compared as whole-gradient norms: rounding differs between a batch of 2 and two of 1
    (oneDNN's kernels), and an instance norm over a near-constant channel amplifies it in
    a single element (0.14 % of the largest gradient on some CPUs), so the bound is on the
    norm of the difference: 1 % of the gradient's, and a tenth of what one sample alone
    gives (accumulation that dropped or double-counted a pass would fail both)."""
    whole = _first_step_gradients(tmp_path, tiny_data, "whole", batch_size=2)
    accum = _first_step_gradients(tmp_path, tiny_data, "accum", batch_size=1, grad_accum_steps=2)
    single = _first_step_gradients(tmp_path, tiny_data, "single", batch_size=1)
    assert whole.keys() == accum.keys() == single.keys()

    def norm(grads: dict) -> float:
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))

    off = norm({k: accum[k] - whole[k] for k in whole})
    alone = norm({k: single[k] - whole[k] for k in whole})
    assert off <= 0.01 * norm(whole), (off, norm(whole))
    assert off <= 0.1 * alone, (off, alone)


def test_finetune_from_a_checkpoint_with_the_encoder_frozen(tmp_path: Path, tiny_data: Path) -> None:
    src_plan, src_path = quick_tiny_plan(tmp_path / "src", tiny_data)
    run_stage(src_path, S1)
    source = src_plan.run_dir / S1 / "checkpoints" / "final.pt"
    plan, path = quick_tiny_plan(tmp_path / "ft", tiny_data, run="ft",
                                 stage_updates={"init_checkpoint": str(source), "freeze": "encoder",
                                                "max_epochs": 2})
    res = run_stage(path, S1)
    assert res["start"].startswith(f"hand-off from {S1} ({source})"), res["start"]
    report = json.loads((plan.run_dir / S1 / "handoff.json").read_text())
    assert report["from"] == S1 and report["max_output_diff"] <= 1e-4
    before = load_checkpoint(source)["model"]
    after = load_checkpoint(plan.run_dir / S1 / "checkpoints" / "final.pt")["model"]
    enc = [k for k in after if k.startswith(("stem.", "encoder.")) and after[k].is_floating_point()]
    dec = [k for k in after if k.startswith(("decoder.", "head.")) and after[k].is_floating_point()]
    assert enc and dec
    for k in enc:
        assert torch.equal(after[k], before[k]), f"frozen encoder tensor {k} changed"
    assert any(not torch.equal(after[k], before[k]) for k in dec), "the decoder did not train"


def test_init_checkpoint_beside_init_from_is_a_config_error(tmp_path: Path) -> None:
    text = replaced(TINY_CURRICULUM.read_text(), "overrides:\n", "overrides:\n  init_checkpoint: x.pt\n", 1)
    text = replaced(text, "../../stages/", str(TINY_CURRICULUM.parents[2] / "stages") + "/")
    bad = tmp_path / "cur.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"stages\.1: stage 'stage2_cnn_attention' has "
                                          r"init_checkpoint and starts from stage 'stage1_basic_cnn'"):
        load_curriculum(bad)


class _DiesInWorker(torch.utils.data.Dataset):
    """Its second item kills the worker process that reads it (as the OOM killer would)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 1:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1)


def test_dead_loader_worker_is_a_clear_stage_error() -> None:
    from orchestrator.errors import StageFailed
    from orchestrator.training.loader import batches

    loader = torch.utils.data.DataLoader(_DiesInWorker(), batch_size=1, num_workers=1, timeout=60)
    with pytest.raises(StageFailed, match=r"stage s1: DataLoader worker \(pid.*\d+\) "
                                          r"(is killed by signal|exited unexpectedly).*set num_workers: 0"):
        list(batches(loader, "s1"))
