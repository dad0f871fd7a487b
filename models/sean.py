"""SEAN: the symmetry-enhanced attention network, LCNN's local path.

The local path sees a stack of ``S = 2T+1`` adjacent axial slices ``(B, S, H, W)``
and predicts logits for the centre slice:

1. :class:`AlignmentNet` (a small spatial transformer) looks at the centre slice and
   predicts a rotation angle and a translation that make the brain bilaterally
   symmetric about the vertical midline of the image. It starts at the identity.
2. The same transform is applied to all ``S`` slices (``affine_grid``/``grid_sample``).
   Gradients flow through the transform parameters, so :func:`alignment_loss`
   trains the alignment net.
3. A shared 2D encoder turns every aligned slice into a feature pyramid.
4. At the deeper levels, :class:`SymmetryAttention` compares each region's features
   with its mirror region across the midline (a flip along W) and attends across
   all ``S`` slices; the slice axis stays ``S`` through the attention.
5. A U-Net decoder builds the centre slice's logits from the centre slice's
   features, and the logits are warped back to the unaligned input frame.

Sign conventions (shared by every function here):
    Coordinates are ``grid_sample``'s normalised ``(x, y)`` with ``x`` along W
    (left to right) and ``y`` along H (top to bottom), in ``[-1, 1]``
    (``align_corners=False``). ``aligned(p) = input(theta @ [p, 1])``.
    ``angle`` (radians) is the rotation applied to the image *content*, measured in
    pixel units: positive turns ``+x`` towards ``+y``, i.e. clockwise on screen when
    row 0 is drawn at the top. A brain whose content was turned by ``+phi`` is made
    symmetric by ``angle = -phi``. ``translation`` ``(tx, ty)`` is the input-frame
    point (normalised units) that lands at the centre of the aligned image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SEAN",
    "AlignmentNet",
    "SymmetryAttention",
    "alignment_loss",
    "rotation_theta",
    "inverse_theta",
    "warp",
]

ALIGN_SIZE_PX = 64
"""The alignment net sees the centre slice average-pooled to this square size."""


def rotation_theta(
    angle: torch.Tensor, translation: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Builds the ``(B, 2, 3)`` sampling matrix that turns image content by ``angle``.

    The rotation is a true rotation in pixel units, also for ``height != width``.

    Args:
        angle: ``(B,)`` content rotation in radians (see the module docstring).
        translation: ``(B, 2)`` input-frame point that maps to the aligned centre.
        height: image height H in pixels.
        width: image width W in pixels.

    Returns:
        ``theta`` of shape ``(B, 2, 3)`` for ``F.affine_grid``.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    row_x = torch.stack([cos, sin * (height / width), translation[:, 0]], dim=-1)
    row_y = torch.stack([-sin * (width / height), cos, translation[:, 1]], dim=-1)
    return torch.stack([row_x, row_y], dim=1)


def inverse_theta(
    angle: torch.Tensor, translation: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Builds the sampling matrix that undoes :func:`rotation_theta` (aligned -> input frame).

    Args:
        angle: ``(B,)`` content rotation in radians used for the forward warp.
        translation: ``(B, 2)`` translation used for the forward warp.
        height: image height H in pixels.
        width: image width W in pixels.

    Returns:
        ``theta_inv`` of shape ``(B, 2, 3)``.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    a00, a01 = cos, -sin * (height / width)
    a10, a11 = sin * (width / height), cos
    tx, ty = translation[:, 0], translation[:, 1]
    row_x = torch.stack([a00, a01, -(a00 * tx + a01 * ty)], dim=-1)
    row_y = torch.stack([a10, a11, -(a10 * tx + a11 * ty)], dim=-1)
    return torch.stack([row_x, row_y], dim=1)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resamples ``(B, C, H, W)`` images with ``theta`` (bilinear, border padding).

    Border padding repeats the background, so a rotation adds no artificial corners.

    Args:
        images: ``(B, C, H, W)`` tensor.
        theta: ``(B, 2, 3)`` sampling matrix.

    Returns:
        The warped ``(B, C, H, W)`` tensor.
    """
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class AlignmentNet(nn.Module):
    """Predicts the symmetry-restoring rotation and translation of a slice.

    The output layer is zero-initialised, so the net starts at the identity
    transform. Outputs are bounded with ``tanh``: ``|angle| <= max_angle_deg`` and
    ``|t| <= max_shift`` (normalised units), which keeps the warp from pushing the
    brain out of the field of view (a trivially "symmetric" blank image).

    Args:
        max_angle_deg: largest correction angle in degrees.
        max_shift: largest translation in normalised units (1.0 = half the image).
    """

    def __init__(self, max_angle_deg: float = 30.0, max_shift: float = 0.25) -> None:
        super().__init__()
        self.max_angle_rad = math.radians(max_angle_deg)
        self.max_shift = max_shift
        layers: list[nn.Module] = []
        for in_ch, out_ch in [(2, 16), (16, 32), (32, 64)]:
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1),
                nn.GroupNorm(4, out_ch),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(64 * 16, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicts the correction for one slice per sample.

        Args:
            image: ``(B, 1, H, W)`` slice.

        Returns:
            ``angle`` ``(B,)`` in radians and ``translation`` ``(B, 2)``.
        """
        small = F.adaptive_avg_pool2d(image, ALIGN_SIZE_PX)
        mean = small.mean(dim=(-2, -1), keepdim=True)
        std = small.std(dim=(-2, -1), keepdim=True) + 1e-5
        small = (small - mean) / std
        # The mirror image makes left-right asymmetry a local feature for the convs.
        raw = self.head(self.hidden(self.features(torch.cat([small, small.flip(-1)], dim=1))))
        angle = self.max_angle_rad * torch.tanh(raw[:, 0])
        translation = self.max_shift * torch.tanh(raw[:, 1:])
        return angle, translation


def _conv_block(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Two 3x3 conv + InstanceNorm + LeakyReLU layers; the first may downsample."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm2d(out_ch, affine=True),
        nn.LeakyReLU(0.01),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.InstanceNorm2d(out_ch, affine=True),
        nn.LeakyReLU(0.01),
    )


class SymmetryAttention(nn.Module):
    """Symmetry-enhanced attention over the slice axis.

    For features ``(B, S, C, h, w)``: every region is compared with its mirror
    region (flip along W) by a 1x1 conv on ``[f, mirror, |f - mirror|]``; then, at
    each position, the ``S`` slice tokens attend to the ``S`` own-side tokens and the
    ``S`` mirror-side tokens (``2S`` keys, with learned slice and side embeddings),
    followed by an MLP. Output keeps the shape ``(B, S, C, h, w)``.

    Args:
        channels: feature channels C.
        num_slices: slices S (2T+1).
        head_dim: channels per attention head.
    """

    def __init__(self, channels: int, num_slices: int, head_dim: int = 32) -> None:
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        self.compare = nn.Sequential(
            nn.Conv2d(3 * channels, channels, 1, bias=False),
            nn.InstanceNorm2d(channels, affine=True),
            nn.LeakyReLU(0.01),
        )
        self.slice_embed = nn.Parameter(torch.zeros(1, num_slices, channels))
        self.side_embed = nn.Parameter(torch.zeros(1, 2, 1, channels))
        nn.init.normal_(self.slice_embed, std=0.02)
        nn.init.normal_(self.side_embed, std=0.02)
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Applies mirror comparison and slice attention.

        Args:
            feats: ``(B, S, C, h, w)`` per-slice features in the aligned frame.

        Returns:
            ``(B, S, C, h, w)`` enhanced features.
        """
        b, s, _, h, w = feats.shape
        flat = rearrange(feats, "b s c h w -> (b s) c h w")
        mirror = flat.flip(-1)
        flat = flat + self.compare(torch.cat([flat, mirror, (flat - mirror).abs()], dim=1))
        own = rearrange(flat, "(b s) c h w -> (b h w) s c", b=b, s=s) + self.slice_embed
        other = rearrange(flat.flip(-1), "(b s) c h w -> (b h w) s c", b=b, s=s) + self.slice_embed
        keys = torch.cat([own + self.side_embed[:, 0], other + self.side_embed[:, 1]], dim=1)
        q = rearrange(self.to_q(self.norm_q(own)), "n s (g d) -> n g s d", g=self.num_heads)
        k, v = rearrange(
            self.to_kv(self.norm_kv(keys)), "n s (two g d) -> two n g s d", two=2, g=self.num_heads
        )
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "n g s d -> n s (g d)")
        tokens = own + self.proj(attended)
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return rearrange(tokens, "(b h w) s c -> b s c h w", b=b, h=h, w=w)


class SEAN(nn.Module):
    """The local path: align, encode all slices, symmetry attention, decode the centre.

    Args:
        in_slices: slices per stack, ``2T+1`` (odd).
        num_classes: output channels.
        base_filters: channels of the first encoder level (doubles per level).
        num_levels: encoder levels; the input must be a multiple of ``2**(num_levels-1)``.
        attention_from_level: first level (0 = full resolution) with symmetry attention.
        checkpointing: recompute encoder blocks in the backward pass to save memory.
    """

    def __init__(
        self,
        in_slices: int = 5,
        num_classes: int = 2,
        base_filters: int = 32,
        num_levels: int = 5,
        attention_from_level: int = 2,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if in_slices < 1 or in_slices % 2 == 0:
            raise ValueError(f"in_slices must be odd (2T+1) and >= 1, got {in_slices}")
        self.in_slices = in_slices
        self.checkpointing = checkpointing
        self.required_multiple = 2 ** (num_levels - 1)
        widths = [base_filters * 2**i for i in range(num_levels)]
        self.align = AlignmentNet()
        self.encoder = nn.ModuleList(
            _conv_block(1 if i == 0 else widths[i - 1], widths[i], 1 if i == 0 else 2)
            for i in range(num_levels)
        )
        self.attention = nn.ModuleDict(
            {
                str(i): SymmetryAttention(widths[i], in_slices)
                for i in range(attention_from_level, num_levels)
            }
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(num_levels - 1)
        )
        self.decoder = nn.ModuleList(
            _conv_block(2 * widths[i], widths[i], 1) for i in range(num_levels - 1)
        )
        self.out = nn.Conv2d(widths[0], num_classes, 1)

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def align_slices(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicts the transform from the centre slice and applies it to all slices.

        Args:
            x: ``(B, S, H, W)`` slice stack.

        Returns:
            Dict with ``angle`` ``(B,)``, ``translation`` ``(B, 2)``, ``theta`` and
            ``theta_inv`` ``(B, 2, 3)``, and ``aligned`` ``(B, S, H, W)`` (not detached).
        """
        height, width = x.shape[-2:]
        centre = x.shape[1] // 2
        angle, translation = self.align(x[:, centre : centre + 1])
        theta = rotation_theta(angle, translation, height, width)
        return {
            "angle": angle,
            "translation": translation,
            "theta": theta,
            "theta_inv": inverse_theta(angle, translation, height, width),
            "aligned": warp(x, theta),
        }

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Computes centre-slice logits in the input (unaligned) frame.

        Args:
            x: ``(B, S, H, W)`` slice stack, H and W multiples of ``required_multiple``.
            return_aux: also return the alignment outputs (see :meth:`align_slices`).

        Returns:
            ``(B, num_classes, H, W)`` logits, or ``(logits, aux)``.
        """
        aux = self.align_slices(x)
        b, s = x.shape[:2]
        feats = rearrange(aux["aligned"], "b s h w -> (b s) 1 h w")
        centre_skips: list[torch.Tensor] = []
        for level, block in enumerate(self.encoder):
            feats = self._run(block, feats)
            if str(level) in self.attention:
                stacked = rearrange(feats, "(b s) c h w -> b s c h w", b=b, s=s)
                stacked = self.attention[str(level)](stacked)
                feats = rearrange(stacked, "b s c h w -> (b s) c h w")
            centre_skips.append(rearrange(feats, "(b s) c h w -> b s c h w", b=b, s=s)[:, s // 2])
        out = centre_skips[-1]
        for level in reversed(range(len(self.up))):
            out = self.up[level](out)
            out = self._run(self.decoder[level], torch.cat([out, centre_skips[level]], dim=1))
        logits = warp(self.out(out), aux["theta_inv"])
        return (logits, aux) if return_aux else logits


def alignment_loss(aux: dict[str, torch.Tensor], reg_weight: float = 1e-2) -> torch.Tensor:
    """Symmetry loss of the aligned slices plus a pull of the transform to identity.

    The symmetry term is, per slice, the L1 distance between the aligned slice and
    its left-right mirror inside the union of the brain and its mirror (pixels above
    the slice's background, its minimum), divided by the slice's total foreground
    intensity (detached), so it is scale-free and about 1 for no symmetry at all.

    Args:
        aux: holds ``aligned`` ``(B, S, H, W)`` and ``theta`` ``(B, 2, 3)``.
        reg_weight: weight of ``mean((theta - identity)**2)``.

    Returns:
        A scalar tensor; gradients reach the alignment net through ``aligned``.
    """
    aligned = aux["aligned"]
    mirror = aligned.flip(-1)
    background = aligned.amin(dim=(-2, -1), keepdim=True).detach()
    span = aligned.amax(dim=(-2, -1), keepdim=True).detach() - background
    tol = 1e-3 * span + 1e-8
    brain = ((aligned - background) > tol) | ((mirror - background) > tol)
    diff = (aligned - mirror).abs() * brain
    mass = 2.0 * (aligned - background).abs().sum(dim=(-2, -1)).detach() + 1e-6
    symmetry = (diff.sum(dim=(-2, -1)) / mass).mean()
    theta = aux["theta"]
    identity = torch.eye(2, 3, dtype=theta.dtype, device=theta.device)
    return symmetry + reg_weight * (theta - identity).pow(2).mean()
