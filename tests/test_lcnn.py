"""Tests of the 2D LCNN: shapes, gradients, slice attention, alignment, trunk size."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.global_path import GlobalPath
from models.lcnn import LCNN
from models.sean import SEAN, alignment_loss, inverse_theta, rotation_theta, warp

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHVISION_RESNEXT50_NO_FC = 22_979_904  # resnext50_32x4d (3 channels) minus its fc layer


def _soft_ellipse(x, y, cx, cy, ax, ay, sharpness=12.0):
    radius = torch.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return torch.sigmoid(sharpness * (1.0 - radius))


def symmetric_phantom(size_px: int, content_angle_deg: float) -> torch.Tensor:
    """A brain-like phantom, mirror-symmetric about x=0, with its content turned.

    The content is turned by ``content_angle_deg`` in the convention of
    ``models.sean`` (positive turns +x towards +y, clockwise on screen): the phantom
    is evaluated at ``R(-phi) q``, so ``angle = -phi`` makes it symmetric again.
    Top and bottom differ, so the vertical axis is its only symmetry axis.
    """
    coords = (torch.arange(size_px) + 0.5) / size_px * 2 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    phi = math.radians(content_angle_deg)
    xs = math.cos(phi) * x + math.sin(phi) * y
    ys = -math.sin(phi) * x + math.cos(phi) * y
    image = _soft_ellipse(xs, ys, 0.0, 0.0, 0.62, 0.8)
    for side in (-1.0, 1.0):
        image = image + 0.6 * _soft_ellipse(xs, ys, side * 0.28, -0.3, 0.14, 0.22)
        image = image - 0.4 * _soft_ellipse(xs, ys, side * 0.2, 0.35, 0.1, 0.12)
    return image + 0.5 * _soft_ellipse(xs, ys, 0.0, 0.05, 0.08, 0.3)


def test_forward_backward_reaches_alignment_and_both_paths():
    torch.manual_seed(0)
    model = LCNN(in_slices=3, num_classes=2)
    x = torch.randn(2, 3, 256, 256)
    target = torch.randint(0, 2, (2, 256, 256))
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (2, 2, 256, 256)
    assert aux["theta"].shape == (2, 2, 3) and aux["angle"].shape == (2,)
    assert aux["aligned"].shape == (2, 3, 256, 256)
    assert torch.allclose(aux["theta"], torch.eye(2, 3).expand(2, 2, 3))  # identity at init

    align_params = dict(model.local_path.align.named_parameters())
    align_loss = alignment_loss(aux)
    grads = torch.autograd.grad(align_loss, list(align_params.values()), retain_graph=True)
    by_name = dict(zip(align_params, grads, strict=True))
    assert all(torch.isfinite(g).all() for g in grads)
    # The zero-initialised output layer gets the symmetry gradient first.
    assert by_name["head.weight"].abs().sum() > 0

    (F.cross_entropy(logits, target) + align_loss).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.local_path.align.head.weight.grad.abs().sum() > 0
    assert model.local_path.encoder[0][0].weight.grad.abs().sum() > 0
    assert model.local_path.attention["2"].to_q.weight.grad.abs().sum() > 0
    assert model.global_path.trunk.stem[0].weight.grad.abs().sum() > 0
    assert model.global_path.trunk.stages[0][0].conv2.weight.grad.abs().sum() > 0


def test_attention_sees_adjacent_slices():
    torch.manual_seed(0)
    sean = SEAN(in_slices=5, num_classes=2, base_filters=8).eval()
    depths = []
    for block in sean.attention.values():
        block.register_forward_hook(lambda _m, _i, out: depths.append(out.shape[1]))
    x = torch.randn(1, 5, 64, 64)
    changed = x.clone()
    changed[:, 0] = torch.randn(64, 64)  # only the outermost, non-centre slice
    with torch.no_grad():
        base, aux = sean(x, return_aux=True)
        other, other_aux = sean(changed, return_aux=True)
    assert depths and all(depth == 5 for depth in depths)  # slice axis kept through attention
    # Same transform (it comes from the centre slice) and the encoder is per slice, so
    # any change can only come through the attention across slices.
    assert torch.equal(aux["theta"], other_aux["theta"])
    assert (base - other).abs().max() > 1e-4

    model = LCNN(in_slices=5, base_filters=8).eval()
    with torch.no_grad():
        assert (model(x) - model(changed)).abs().max() > 1e-4


def test_alignment_net_recovers_known_rotation():
    torch.manual_seed(0)
    model = LCNN(in_slices=3, base_filters=8)
    size_px, angles_deg = 64, (8.0, -8.0)
    phantoms = torch.stack([symmetric_phantom(size_px, a) for a in angles_deg])
    stacks = phantoms[:, None].expand(-1, 3, -1, -1).contiguous()
    align_net = model.local_path.align
    optimizer = torch.optim.Adam(align_net.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
    for _ in range(200):
        loss = alignment_loss(model.local_path.align_slices(stacks))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    for param in align_net.parameters():  # past the identity init every layer learns
        assert param.grad.abs().sum() > 0
    with torch.no_grad():
        predicted_deg = torch.rad2deg(model.local_path.align_slices(stacks)["angle"])
    expected_deg = -torch.tensor(angles_deg)  # the correction undoes the content turn
    assert (predicted_deg - expected_deg).abs().max() < 2.0, predicted_deg.tolist()


def test_inverse_transform_undoes_alignment_on_non_square_images():
    angle = torch.tensor([0.2, -0.1])
    translation = torch.tensor([[0.05, -0.03], [0.0, 0.1]])
    theta = rotation_theta(angle, translation, 48, 80)
    theta_inv = inverse_theta(angle, translation, 48, 80)
    bottom = torch.tensor([0.0, 0.0, 1.0]).expand(2, 1, 3)
    product = torch.cat([theta, bottom], 1) @ torch.cat([theta_inv, bottom], 1)
    assert torch.allclose(product, torch.eye(3).expand(2, 3, 3), atol=1e-6)
    image = torch.zeros(1, 1, 48, 80)
    image[..., 20:28, 30:50] = 1.0
    round_trip = warp(warp(image, theta[:1]), theta_inv[:1])
    assert (round_trip - image)[..., 12:36, 20:60].abs().mean() < 0.05


def test_global_trunk_is_resnext50_32x4d():
    trunk = GlobalPath(in_slices=5).trunk
    num_params = sum(p.numel() for p in trunk.parameters())
    assert num_params == TORCHVISION_RESNEXT50_NO_FC + 2 * 64 * 7 * 7  # 22,986,176
    assert 22.5e6 < num_params < 25e6
    assert trunk.stages[0][0].conv2.groups == 32 and trunk.stages[0][0].conv2.out_channels == 128


def test_bad_input_size_raises_naming_the_multiple():
    model = LCNN(in_slices=3, base_filters=4)
    assert model.required_multiple == 32
    with pytest.raises(ValueError, match="required_multiple=32"):
        model(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 5, 64, 64))
    with pytest.raises(ValueError, match="odd"):
        LCNN(in_slices=4)


def test_models_import_without_orchestrator():
    code = (
        "import sys; from models.lcnn import LCNN; "
        "assert not any(m.startswith('orchestrator') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
