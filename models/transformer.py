"""Transformer branch at the U-Net bottleneck, with a learned 3D position embedding."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.blocks import TransformerBlock
from torch import nn

from models.blocks import norm, tag

logger = logging.getLogger(__name__)


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, ...],
                     new_grid: tuple[int, ...]) -> torch.Tensor:
    """Resample a (1, tokens, dim) position embedding from one token grid to another.

    Trilinear with align_corners=False; the forward pass and the hand-off both use this
    function, so a hand-off to a new grid computes what the old model computed there.

    Args:
        pos: the embedding, tokens = prod(old_grid), in (x y z) order.
        old_grid: its token grid; new_grid: the wanted one.

    Returns:
        A (1, prod(new_grid), dim) tensor (pos itself when the grids are equal).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    gx, gy, gz = old_grid
    vol = rearrange(pos, "1 (x y z) d -> 1 d x y z", x=gx, y=gy, z=gz)
    vol = F.interpolate(vol, size=tuple(new_grid), mode="trilinear", align_corners=False)
    return rearrange(vol, "1 d x y z -> 1 (x y z) d")


class BottleneckTransformer(nn.Module):
    """Residual transformer branch on the bottleneck: `x + proj_out(T(proj_in(norm x) + pos))`.

    Every voxel of the bottleneck is a token. The branch is the identity when `proj_out`
    is zero, and each transformer block is the identity when its attention output
    projection and its MLP's last linear layer are zero.

    Args:
        channels: width of the bottleneck stream; space: its channel space.
        dim: token width (fixed across stages so that blocks carry over unchanged).
        depth: number of transformer blocks.
        heads: attention heads (dim must be a multiple).
        grid: token grid the position embedding is stored at (bottleneck sides at the
            configured input size); other grids are interpolated on the fly.
        mlp_ratio: MLP hidden width / dim.

    Raises:
        ValueError: dim is not a multiple of heads.
    """

    handoff_last_layers = ("proj_out",)

    def __init__(self, channels: int, space: str, dim: int, depth: int, heads: int,
                 grid: tuple[int, ...], mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer_dim {dim} must be a multiple of transformer_heads "
                             f"{heads}")
        self.pos_embed_grid = tuple(int(g) for g in grid)
        self.norm_in = norm(channels, space)
        self.proj_in = tag(nn.Linear(channels, dim), None, space)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_embed_grid), dim))
        nn.init.normal_(self.pos_embed, std=0.02)  # not trunc_normal_: loops on data
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = TransformerBlock(dim, int(dim * mlp_ratio), heads, use_flash_attention=True)
            # unused without cross-attention: no dead params (add_module, as MONAI types the
            # attribute LayerNorm)
            blk.add_module("norm_cross_attn", nn.Identity())
            # torch types Module.__setattr__'s value Tensor | Module; any other value is a plain attribute
            blk.handoff_last_layers = ("attn.out_proj", "mlp.linear2")  # type: ignore[assignment]
            self.blocks.append(blk)
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = tag(nn.Linear(dim, channels), space, None)

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The position embedding for a token grid (interpolated if not the stored one)."""
        return resize_pos_embed(self.pos_embed, self.pos_embed_grid, grid)

    def forward(self, x: torch.Tensor,
                run_block: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Apply the branch; `run_block(block, t)` may wrap blocks (gradient checkpointing)."""
        gx, gy, gz = x.shape[2:]
        t = rearrange(self.norm_in(x), "b c x y z -> b (x y z) c")
        t = self.proj_in(t) + self.position_embedding((gx, gy, gz)).to(t.dtype)
        for blk in self.blocks:
            t = run_block(blk, t) if run_block is not None else blk(t)
        t = self.proj_out(self.norm_out(t))
        return x + rearrange(t, "b (x y z) c -> b c x y z", x=gx, y=gy, z=gz)
