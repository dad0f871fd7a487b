"""Stage hand-off: Net2Net widening, new branches at zero, position-embedding resampling."""
from __future__ import annotations

import json

import pytest
import torch

import models
from orchestrator.training.handoff import space_map, transfer_weights

TINY = (1, 1, 32, 32, 32)
STATUSES = {"copied", "widened", "interpolated", "new", "dropped"}


def tiny(stage: str, base_filters: int, size_vox: int = 32) -> models.ResUNet3D:
    """A preset at small width (same structure and width ratios as the defaults)."""
    kw = {**models.STAGE_PRESETS[stage], "base_filters": base_filters,
          "input_size_vox": (size_vox,) * 3}
    if kw.get("transformer_depth"):
        kw.update(transformer_dim=16, transformer_heads=2)
    return models.build_model("resunet3d", **kw)


def trained(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Perturb every parameter, so that no branch of the old model is still at its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def check_report(report: dict, new: torch.nn.Module, tmp_path) -> dict:
    path = tmp_path / "handoff.json"
    path.write_text(json.dumps(report))
    loaded = json.loads(path.read_text())
    assert set(new.state_dict()) <= set(loaded["tensors"])
    assert set(loaded["tensors"].values()) <= STATUSES
    assert sum(loaded["counts"].values()) == len(loaded["tensors"])
    assert loaded["output_scale"] > 0
    return loaded


# Base filters keep the presets' ratios (8:16:24:32 -> 2:4:6:8), so the tiny pairs have
# the same structure as the default ones, including the dense -> grouped step 2 -> 3.
@pytest.mark.parametrize("old_stage, old_bf, new_stage, new_bf", [
    ("stage1_basic_cnn", 2, "stage2_cnn_attention", 4),
    ("stage2_cnn_attention", 4, "stage3_hybrid_small", 6),
    ("stage3_hybrid_small", 6, "stage4_hybrid_full", 8),
    ("stage1_basic_cnn", 8, "stage1_basic_cnn", 16),      # plain widening x2
    ("stage3_hybrid_small", 6, "stage3_hybrid_small", 9),  # grouped widening x1.5
])
def test_handoff_preserves_function(old_stage, old_bf, new_stage, new_bf, tmp_path):
    old, new = trained(tiny(old_stage, old_bf)), tiny(new_stage, new_bf)
    report = check_report(transfer_weights(old, new, TINY), new, tmp_path)
    assert report["max_output_diff"] <= 1e-4 * report["output_scale"], report["max_output_diff"]
    assert report["counts"]["widened"] > 0 and report["counts"]["dropped"] == 0


def test_new_branches_start_at_zero_and_replicas_differ():
    old, new = trained(tiny("stage1_basic_cnn", 8)), tiny("stage2_cnn_attention", 16)
    report = transfer_weights(old, new, TINY, noise_std=1e-2)
    sd, old_sd = new.state_dict(), old.state_dict()
    assert report["tensors"]["decoder.0.gate.psi.weight"] == "new"
    assert report["tensors"]["encoder.0.blocks.0.se.fc1.weight"] == "new"
    for name in ("decoder.0.gate.psi.weight", "encoder.0.blocks.0.se.fc2.weight",
                 "encoder.0.blocks.0.se.fc2.bias"):
        assert name in report["zeroed"] and not sd[name].any()
    assert "encoder.0.blocks.0.se.fc1.weight" not in report["zeroed"]  # not a last layer
    # conv1 reads the residual stream, widened 8 -> 16 by replicating each unit once: the
    # two copies of an input column sum to the old column (function kept) but differ.
    name = "encoder.0.blocks.0.conv1.weight"
    assert report["tensors"][name] == "widened"
    w, w_old = sd[name], old_sd[name]
    assert w.shape == (4, 16, 1, 1, 1) and w_old.shape == (2, 8, 1, 1, 1)
    torch.testing.assert_close(w[:2, :8] + w[:2, 8:], w_old, rtol=0, atol=1e-6)
    torch.testing.assert_close(w[2:], w[:2], rtol=0, atol=0.1)  # new rows copy old rows
    assert not torch.equal(w[:, :8], w[:, 8:])


def test_extra_blocks_are_identity_after_handoff():
    old, new = trained(tiny("stage3_hybrid_small", 6)), tiny("stage4_hybrid_full", 8)
    report = transfer_weights(old, new, TINY)
    assert report["tensors"]["encoder.2.blocks.1.conv3.weight"] == "new"
    assert not new.state_dict()["encoder.2.blocks.1.conv3.weight"].any()
    assert report["tensors"]["transformer.blocks.1.mlp.linear2.weight"] == "copied"
    assert "transformer.blocks.5.attn.out_proj.weight" in report["zeroed"]
    assert "ds_heads.0.conv.weight" in report["zeroed"]


def test_pos_embed_is_interpolated_to_the_new_token_grid():
    """Stage 3 built for 32^3 (token grid 2^3) -> stage 4 built for 48^3 (grid 3^3).

    Exact at the new input size: the old model resamples its embedding to 3^3 on the fly
    with the very function the hand-off uses. Not exact at the old input size: there the new
    model resamples 3^3 back to 2^3, and trilinear down(up(p)) != p; the bound below is
    what that round trip costs with a well-trained (0.1-perturbed) embedding.
    """
    old = trained(tiny("stage3_hybrid_small", 6))
    new = tiny("stage4_hybrid_full", 8, size_vox=48)
    at_new = transfer_weights(old, new, (1, 1, 48, 48, 48))
    assert at_new["tensors"]["transformer.pos_embed"] == "interpolated"
    assert new.transformer.pos_embed.shape == (1, 27, 16)
    assert at_new["max_output_diff"] <= 1e-4 * at_new["output_scale"]
    new = tiny("stage4_hybrid_full", 8, size_vox=48)
    at_old = transfer_weights(old, new, TINY)
    assert 0 < at_old["max_output_diff"] <= 2e-2 * at_old["output_scale"]


def test_incompatible_widths_are_reported_not_faked(tmp_path):
    """A narrower new model cannot copy the old function: its tensors are new, honestly."""
    old, new = trained(tiny("stage1_basic_cnn", 8)), tiny("stage1_basic_cnn", 4)
    report = check_report(transfer_weights(old, new, TINY), new, tmp_path)
    assert report["tensors"]["stem.weight"] == "new"
    assert report["max_output_diff"] > 1e-4 * report["output_scale"]


def test_space_map_dense_to_grouped():
    # Dense hidden of 4 units -> 4 groups of 4: every group holds a full copy.
    smap = space_map(4, 16, old_groups=1, new_groups=4)
    assert smap.full.tolist() == [0, 1, 2, 3] * 4
    assert smap.within.tolist() == [0, 1, 2, 3] and smap.full_counts.tolist() == [4] * 4
    # 2 groups of 2 -> 4 groups of 3: groups 0, 1 descend from old group 0, 2, 3 from 1.
    smap = space_map(4, 12, old_groups=2, new_groups=4)
    assert smap.full.tolist() == [0, 1, 0, 0, 1, 0, 2, 3, 2, 2, 3, 2]
    assert smap.within_counts.tolist() == [2, 1]
    assert space_map(8, 4) is None  # shrinking
    assert space_map(8, 16, old_groups=1, new_groups=8) is None  # groups narrower than old
