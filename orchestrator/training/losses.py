"""Losses of the 3D family, written so the planner can run them on fake tensors.

`GeneralizedDiceFocalLoss` computes exactly what MONAI's class of that name computes
with `to_onehot_y=True, softmax=True` (square weights, mean reduction; a test holds the
two equal), but without data-dependent Python (MONAI's calls `.tolist()` on a tensor
and assigns through a boolean mask), which the planner's fake-tensor estimate cannot
run. Deep supervision stays MONAI's `DeepSupervisionLoss` wrapper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeneralizedDiceFocalLoss(nn.Module):
    """Generalized Dice (Sudre et al., square weights, on softmax) + sigmoid focal loss.

    Args:
        gamma: focal exponent.
        lambda_gdl, lambda_focal: weights of the two terms.
        smooth_nr, smooth_dr: added to the Dice numerator and denominator.
    """

    def __init__(self, gamma: float = 2.0, lambda_gdl: float = 1.0, lambda_focal: float = 1.0,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        if lambda_gdl < 0 or lambda_focal < 0:
            raise ValueError("lambda_gdl and lambda_focal must be >= 0")
        self.gamma, self.lambda_gdl, self.lambda_focal = gamma, lambda_gdl, lambda_focal
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, C, *spatial); target (B, 1, *spatial) integer labels in [0, C)."""
        n_classes = logits.shape[1]
        onehot = F.one_hot(target[:, 0].long(), n_classes).movedim(-1, 1).to(logits.dtype)
        log_p = logits.log_softmax(1)
        p = log_p.exp()
        axes = tuple(range(2, logits.ndim))
        tp = (p * onehot).sum(axes)
        fp = p.sum(axes) - tp
        fn = onehot.sum(axes) - tp
        w = 1.0 / onehot.sum(axes).square()
        infs = torch.isinf(w)
        w = torch.where(infs, torch.zeros_like(w), w)  # absent class: weight of the largest
        w = w + infs * w.max(dim=1, keepdim=True).values
        numer = 2.0 * (tp * w).sum(1) + self.smooth_nr
        denom = ((2 * tp + fp + fn) * w).sum(1) + self.smooth_dr
        gdl = (1.0 - numer / denom).mean()
        # MONAI's GeneralizedDiceFocalLoss builds its FocalLoss without use_softmax, so the
        # focal term is the per-class sigmoid one: BCE with logits times (1 - p_t)^gamma.
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        focal = ((F.logsigmoid(-logits * (onehot * 2 - 1)) * self.gamma).exp() * bce).mean()
        return self.lambda_gdl * gdl + self.lambda_focal * focal
