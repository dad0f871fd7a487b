"""LCNN: 2D lesion segmentation from stacks of 2T+1 adjacent axial slices.

Two paths predict logits for the centre slice and are fused by a weighted sum:

* the local path, :class:`models.sean.SEAN` (alignment net, symmetry-enhanced
  attention across all slices, decoder; logits mapped back to the input frame);
* the global path, :class:`models.global_path.GlobalPath` (ResNeXt50 32x4d trunk over
  the slices as channels, logits upsampled to H x W).

Train with Dice + cross-entropy on the logits plus
:func:`models.sean.alignment_loss` on ``aux`` (``forward(x, return_aux=True)``); the
alignment net receives its gradient through the non-detached aligned slices.

The seed repository's constructor works as written: ``LCNN(num_channels=1,
num_classes=2, T=1)`` is ``LCNN(in_slices=3)`` (T slices either side of the centre, one
grey channel each).

Example:
    >>> model = LCNN(in_slices=5)
    >>> logits, aux = model(torch.zeros(1, 5, 64, 64), return_aux=True)
    >>> loss = alignment_loss(aux)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from models.global_path import GlobalPath
from models.sean import SEAN, alignment_loss

__all__ = ["LCNN", "alignment_loss"]


class LCNN(nn.Module):
    """SEAN local path + ResNeXt50 global path, fused by a weighted sum of logits.

    Args:
        in_slices: slices per stack, ``2T+1`` (odd); the centre slice is segmented.
        num_classes: output channels.
        base_filters: first-level channels of the local path's encoder.
        global_weight: weight of the global path's logits.
        local_weight: weight of the local path's logits.
        checkpointing: gradient checkpointing in both paths (saves activation memory).
        num_channels: the seed's name: channels per slice; only 1 (grey slices).
        T: the seed's name: slices either side of the centre; in_slices = 2T+1.

    Attributes:
        required_multiple: H and W must be multiples of this (32, the global trunk's stride).
    """

    def __init__(
        self,
        in_slices: int | None = None,
        num_classes: int = 2,
        base_filters: int = 32,
        global_weight: float = 0.3,
        local_weight: float = 0.7,
        checkpointing: bool = False,
        num_channels: int | None = None,
        T: int | None = None,  # noqa: N803 - the seed's argument name
    ) -> None:
        super().__init__()
        in_slices = _seed_in_slices(in_slices, num_channels, T)
        if in_slices < 1 or in_slices % 2 == 0:
            raise ValueError(f"LCNN: in_slices must be odd (2T+1) and >= 1, got {in_slices}")
        if num_classes < 1 or base_filters < 1:
            raise ValueError(
                "LCNN: num_classes and base_filters must be >= 1, "
                f"got {num_classes}, {base_filters}"
            )
        if global_weight < 0 or local_weight < 0 or global_weight + local_weight <= 0:
            raise ValueError(
                "LCNN: fusion weights must be >= 0 and not both 0, "
                f"got global_weight={global_weight}, local_weight={local_weight}"
            )
        self.in_slices = in_slices
        self.num_classes = num_classes
        self.global_weight = float(global_weight)
        self.local_weight = float(local_weight)
        self.local_path = SEAN(in_slices, num_classes, base_filters, checkpointing=checkpointing)
        self.global_path = GlobalPath(in_slices, num_classes, checkpointing=checkpointing)
        multiple = max(self.local_path.required_multiple, GlobalPath.required_multiple)
        self.required_multiple: int = multiple

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The encoders of both paths (SEAN's alignment net and encoder, the global
        ResNeXt trunk): what fine-tuning with a frozen encoder keeps fixed."""
        for part in (self.local_path.align, self.local_path.encoder, self.global_path.trunk):
            yield from part.parameters()

    @property
    def checkpointing(self) -> bool:
        """Whether both paths recompute activations in the backward pass."""
        return self.local_path.checkpointing

    @checkpointing.setter
    def checkpointing(self, enabled: bool) -> None:
        self.local_path.checkpointing = enabled
        self.global_path.trunk.checkpointing = enabled

    def check_input(self, x: torch.Tensor) -> None:
        """Raises ValueError unless ``x`` is ``(B, in_slices, H, W)`` with H, W multiples.

        Args:
            x: candidate input.
        """
        if x.ndim != 4 or x.shape[1] != self.in_slices:
            raise ValueError(
                f"LCNN expects (B, {self.in_slices}, H, W) slice stacks, got shape {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height % self.required_multiple or width % self.required_multiple:
            raise ValueError(
                f"LCNN: H and W must be multiples of required_multiple={self.required_multiple}, "
                f"got {height}x{width}"
            )

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Segments the centre slice of each stack.

        Args:
            x: ``(B, in_slices, H, W)`` adjacent axial slices.
            return_aux: also return ``aux``: ``theta``/``theta_inv`` ``(B, 2, 3)``,
                ``angle`` ``(B,)`` (content rotation, radians), ``translation`` ``(B, 2)``,
                ``aligned`` ``(B, in_slices, H, W)``, ``local_logits`` and
                ``global_logits`` ``(B, num_classes, H, W)``.

        Returns:
            ``(B, num_classes, H, W)`` logits in the input frame, or ``(logits, aux)``.
        """
        self.check_input(x)
        local_logits, aux = self.local_path(x, return_aux=True)
        global_logits = self.global_path(x)
        logits = self.local_weight * local_logits + self.global_weight * global_logits
        if not return_aux:
            return logits
        aux = {**aux, "local_logits": local_logits, "global_logits": global_logits}
        return logits, aux


def _seed_in_slices(in_slices: int | None, num_channels: int | None, T: int | None) -> int:  # noqa: N803
    """in_slices from ours (default 5) or the seed's (num_channels=1, T): 2T+1."""
    if num_channels not in (None, 1):
        raise ValueError(f"LCNN: num_channels must be 1 (grey slices), got {num_channels}")
    if T is None:
        return 5 if in_slices is None else in_slices
    if T < 0:
        raise ValueError(f"LCNN: T must be >= 0 (slices either side of the centre), got {T}")
    if in_slices is not None and in_slices != 2 * T + 1:
        raise ValueError(f"LCNN: in_slices {in_slices} and T {T} disagree; expected in_slices = 2T+1")
    return 2 * T + 1
