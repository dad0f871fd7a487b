"""Boundary loss, its schedule and the signed distance map: hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestrator.data.distance import signed_distance_map
from orchestrator.training.losses import BoundaryLoss, GeneralizedDiceFocalLoss, RegionBoundaryLoss

LN3 = math.log(3.0)  # softmax([0, ln 3]) = [0.25, 0.75]


def test_signed_distance_map_by_hand() -> None:
    np.testing.assert_allclose(signed_distance_map(np.array([0, 0, 1, 1, 0])),
                               [1.5, 0.5, -0.5, -0.5, 0.5])
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[1:4, 1:4, 1:4] = 1
    sdm = signed_distance_map(mask)
    assert sdm.dtype == np.float32 and sdm.shape == mask.shape
    assert sdm[2, 2, 2] == pytest.approx(-1.5)  # two voxels from the nearest background
    assert sdm[0, 0, 0] == pytest.approx(math.sqrt(3) - 0.5)  # diagonal to (1, 1, 1)
    assert (sdm[mask == 1] < 0).all() and (sdm[mask == 0] > 0).all()


@pytest.mark.parametrize("fill", [0, 1])
def test_signed_distance_map_without_boundary_is_zero(fill: int) -> None:
    assert not signed_distance_map(np.full((3, 3, 3), fill)).any()


def _logits(p_fg_is_075: list[int]) -> torch.Tensor:
    """(1, 2, 2, 2, 2) logits: foreground probability 0.75 where flagged, 0.5 elsewhere."""
    fg = torch.tensor(p_fg_is_075, dtype=torch.float32).reshape(1, 1, 2, 2, 2) * LN3
    return torch.cat([torch.zeros_like(fg), fg], 1)


def test_boundary_loss_by_hand() -> None:
    logits = _logits([0, 1, 0, 1, 0, 0, 0, 0])
    sdm = torch.tensor([-0.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]).reshape(1, 1, 2, 2, 2)
    # (0.5*-0.5 + 0.75*-0.5 + 0.5*0.5 + 0.75*1.5) / 8 = 0.75 / 8
    assert BoundaryLoss()(logits, sdm).item() == pytest.approx(0.09375)


def test_boundary_loss_multiclass_and_sigmoid() -> None:
    logits = torch.zeros(1, 3, 2, 1, 1)  # softmax 1/3 each
    sdm = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).reshape(1, 2, 2, 1, 1)  # one map per fg class
    assert BoundaryLoss()(logits, sdm).item() == pytest.approx((1 - 2 + 3) / 3 / 4)
    union = torch.tensor([3.0, -3.0]).reshape(1, 1, 2, 1, 1)  # 1 - p(background) = 2/3
    assert BoundaryLoss()(logits, union).item() == pytest.approx(0.0)
    one = torch.tensor([0.0, LN3]).reshape(1, 1, 2, 1, 1)  # sigmoid: 0.5, 0.75
    assert BoundaryLoss()(one, union).item() == pytest.approx((1.5 - 2.25) / 2)


def test_boundary_loss_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="sdm has 3 channels for 2 classes"):
        BoundaryLoss()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match=r"does not match logits \(1, 2, 4, 4, 4\)"):
        BoundaryLoss()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 2))


def test_schedule_and_combination() -> None:
    loss = RegionBoundaryLoss(boundary_weight_start=0.1, boundary_weight_end=0.5, ramp_epochs=4)
    assert [loss.alpha(e) for e in (0, 2, 4, 9)] == pytest.approx([0.1, 0.3, 0.5, 0.5])
    assert loss.alpha(None) == 0.5
    assert RegionBoundaryLoss(0.1, 0.7, ramp_epochs=0).alpha(0) == 0.7
    logits = _logits([1, 0, 0, 1, 0, 0, 0, 0])
    target = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]).reshape(1, 1, 2, 2, 2).float()
    sdm = torch.from_numpy(signed_distance_map(target[0, 0].numpy()))[None, None]
    regional = GeneralizedDiceFocalLoss()(logits, target)
    boundary = BoundaryLoss()(logits, sdm)
    expected = 0.7 * regional.item() + 0.3 * boundary.item()
    assert loss(logits, target, sdm, epoch=2).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="boundary_weight_end 1.5; expected a weight in"):
        RegionBoundaryLoss(boundary_weight_end=1.5)


def test_empty_mask_gives_finite_loss_and_gradients() -> None:
    logits = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4, 4)
    sdm = torch.from_numpy(signed_distance_map(np.zeros((4, 4, 4))))[None, None].expand(2, 1, 4, 4, 4)
    loss = RegionBoundaryLoss()(logits, target, sdm, epoch=10)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert BoundaryLoss()(logits, sdm).item() == 0.0


def test_runs_on_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
        target = torch.randint(0, 2, (2, 1, 8, 8, 8)).float()
        sdm = torch.randn(2, 1, 8, 8, 8)
        loss = RegionBoundaryLoss()(logits, target, sdm, epoch=3)
        loss.backward()
        assert loss.shape == () and logits.grad.shape == logits.shape


def test_generalized_dice_focal_equals_monai() -> None:
    from monai.losses import GeneralizedDiceFocalLoss as MonaiGDFL

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, 5)
    target = torch.randint(0, 3, (2, 1, 5, 5, 5)).float()
    target[1] = 0  # an absent class in one sample
    ours = GeneralizedDiceFocalLoss()(logits, target)
    theirs = MonaiGDFL(to_onehot_y=True, softmax=True)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
