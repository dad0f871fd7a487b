"""The 3D model family: parameter budgets, shapes, errors, checkpointing, DS, AMP, isolation."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import models

ROOT = Path(__file__).resolve().parents[1]
TINY = (1, 1, 32, 32, 32)


def tiny(stage: str, base_filters: int = 4, **over) -> models.ResUNet3D:
    """A preset at small width (same structure), built for 32^3 inputs."""
    kw = {**models.STAGE_PRESETS[stage], "base_filters": base_filters,
          "input_size_vox": (32, 32, 32)}
    if kw.get("transformer_depth"):
        kw.update(transformer_dim=16, transformer_heads=2)
    kw.update(over)
    return models.build_model("resunet3d", **kw)


@pytest.mark.parametrize("stage, target_params", [
    ("stage1_basic_cnn", 0.5e6),
    ("stage2_cnn_attention", 2e6),
    ("stage3_hybrid_small", 8e6),
    ("stage4_hybrid_full", 22e6),
])
def test_preset_param_count_within_20_percent(stage, target_params):
    with torch.device("meta"):
        net = models.build_model("resunet3d", **models.STAGE_PRESETS[stage])
    params = sum(p.numel() for p in net.parameters())
    assert 0.8 * target_params <= params <= 1.2 * target_params, params


@pytest.mark.parametrize("stage, input_shape, out_shape", [
    ("stage1_basic_cnn", (1, 1, 32, 32, 32), (1, 2, 32, 32, 32)),
    ("stage2_cnn_attention", (1, 1, 32, 48, 32), (1, 2, 32, 48, 32)),
    ("stage3_hybrid_small", (1, 1, 32, 48, 64), (1, 2, 32, 48, 64)),  # pos grid resized
    ("stage4_hybrid_full", (2, 1, 32, 32, 32), (2, 2, 32, 32, 32)),
])
def test_output_shape_in_eval(stage, input_shape, out_shape):
    net = tiny(stage).eval()
    with torch.no_grad():
        out = net(torch.randn(input_shape))
    assert isinstance(out, torch.Tensor) and out.shape == out_shape


def test_wrong_input_size_names_the_required_multiple():
    net = tiny("stage1_basic_cnn")
    assert net.required_multiple == 16
    with pytest.raises(ValueError, match=r"input spatial size \(50, 64, 64\) must be a "
                                         r"multiple of 16 on every side"):
        net(torch.randn(1, 1, 50, 64, 64))
    with pytest.raises(ValueError, match=r"input must be \(batch, 1, x, y, z\)"):
        net(torch.randn(1, 3, 32, 32, 32))


def test_build_model_rejects_unknown_arch_and_option():
    with pytest.raises(ValueError, match=r"unknown model arch 'unet9d' \(valid: .*resunet3d"):
        models.build_model("unet9d")
    with pytest.raises(TypeError, match=r"unknown option 'base_filter' \(valid: .*base_filters"):
        models.build_model("resunet3d", base_filter=8)
    with pytest.raises(ValueError, match=r"levels must be an integer >= 1"):
        models.build_model("resunet3d", levels=0)
    with pytest.raises(ValueError, match=r"input_size_vox \(100, 96, 96\) must be 3 positive "
                                         r"multiples of 16"):
        models.build_model("resunet3d", input_size_vox=(100, 96, 96))


def test_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    plain = tiny("stage4_hybrid_full")
    ckpt = tiny("stage4_hybrid_full", checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(TINY)
    results = []
    for net in (plain, ckpt):
        outs = net.train()(x)
        sum((o * o).mean() for o in outs).backward()
        results.append(([o.detach() for o in outs],
                        {n: p.grad.clone() for n, p in net.named_parameters()}))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_deep_supervision_list_in_train_single_tensor_in_eval():
    net = tiny("stage4_hybrid_full")
    x = torch.randn(TINY)
    outs = net.train()(x)
    assert [tuple(o.shape) for o in outs] == [(1, 2, 32, 32, 32), (1, 2, 16, 16, 16),
                                              (1, 2, 8, 8, 8)]
    with torch.no_grad():
        assert tuple(net.eval()(x).shape) == (1, 2, 32, 32, 32)  # one tensor, full size


def test_bf16_autocast_forward_on_cpu():
    net = tiny("stage3_hybrid_small").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(TINY))
    assert out.shape == (1, 2, 32, 32, 32) and torch.isfinite(out.float()).all()


def test_forward_backward_on_fake_tensors():
    """The memory planner runs steps on FakeTensors: no data-dependent control flow."""
    with FakeTensorMode():
        net = tiny("stage4_hybrid_full", checkpointing=True)
        outs = net.train()(torch.empty(2, 1, 32, 32, 32))
        sum(o.mean() for o in outs).backward()
        assert net.stem.weight.grad.shape == net.stem.weight.shape


def test_presets_nest_by_parameter_name():
    """Stage k's tensors exist in stage k+1 under the same names (the hand-off relies on it)."""
    names = []
    for stage in models.STAGE_PRESETS:
        with torch.device("meta"):
            names.append(set(models.build_model("resunet3d", **models.STAGE_PRESETS[stage])
                             .state_dict()))
    for smaller, bigger in zip(names, names[1:]):
        assert smaller <= bigger, sorted(smaller - bigger)[:5]


def test_import_models_does_not_import_orchestrator():
    code = ("import sys, models; bad = [m for m in sys.modules if m == 'orchestrator' or "
            "m.startswith('orchestrator.')]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
