"""Losses of the 3D family, written so the planner can run them on fake tensors.

`GeneralizedDiceFocalLoss` computes exactly what MONAI's class of that name computes
with `to_onehot_y=True, softmax=True` (square weights, mean reduction; a test holds the
two equal), but without data-dependent Python (MONAI's calls `.tolist()` on a tensor
and assigns through a boolean mask), which the planner's fake-tensor estimate cannot
run. Deep supervision stays MONAI's `DeepSupervisionLoss` wrapper.

`BoundaryLoss` (Kervadec et al., "Boundary loss for highly unbalanced segmentation",
MIDL 2019) weights the foreground probability with the ground truth's signed distance map
(`orchestrator.data.distance.signed_distance_map`, precomputed by the data cache);
`RegionBoundaryLoss` moves weight from the regional loss to it as training goes on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeneralizedDiceFocalLoss(nn.Module):
    """Generalized Dice (Sudre et al., square weights, on softmax) + sigmoid focal loss.

    Args:
        gamma: focal exponent.
        alpha: weight of each class's positive voxels in the focal term (1 - alpha its
            negatives'), as MONAI's `FocalLoss(alpha=...)`; None: no weighting.
        lambda_gdl, lambda_focal: weights of the two terms.
        smooth_nr, smooth_dr: added to the Dice numerator and denominator.
    """

    def __init__(self, gamma: float = 2.0, lambda_gdl: float = 1.0, lambda_focal: float = 1.0,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, alpha: float | None = None) -> None:
        super().__init__()
        if lambda_gdl < 0 or lambda_focal < 0:
            raise ValueError("lambda_gdl and lambda_focal must be >= 0")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha {alpha}; expected a weight in [0, 1] or None")
        self.gamma, self.alpha, self.lambda_gdl, self.lambda_focal = gamma, alpha, lambda_gdl, lambda_focal
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
        focal = (F.logsigmoid(-logits * (onehot * 2 - 1)) * self.gamma).exp() * bce
        if self.alpha is not None:
            focal = (onehot * self.alpha + (1 - onehot) * (1 - self.alpha)) * focal
        focal = focal.mean()
        return self.lambda_gdl * gdl + self.lambda_focal * focal


class BoundaryLoss(nn.Module):
    """Boundary loss (Kervadec et al., 2019): mean of foreground probability x signed distance.

    Minimised by putting probability on the voxels with negative distance (inside the
    lesion); every probability given outside costs its distance to the lesion. Only shape
    arithmetic, no data-dependent Python, so it runs on FakeTensors.
    """

    def forward(self, logits: torch.Tensor, sdm: torch.Tensor) -> torch.Tensor:
        """Boundary loss of a batch.

        Args:
            logits: (B, C, *spatial). C == 1: sigmoid foreground probability; C >= 2:
                softmax, the foreground being the classes 1..C-1.
            sdm: (B, K, *spatial) signed distance maps (`signed_distance_map`). K == 1:
                one map of the union of the foreground classes, weighted by 1 - p(class 0);
                K == C - 1 (C >= 2): one map per foreground class.

        Returns:
            The scalar mean over batch, foreground channels and voxels.

        Raises:
            ValueError: `sdm`'s batch or spatial shape differs from `logits`', or K is
                neither 1 nor C - 1.
        """
        n_classes = logits.shape[1]
        if sdm.ndim != logits.ndim or sdm.shape[0] != logits.shape[0] or sdm.shape[2:] != logits.shape[2:]:
            raise ValueError(f"BoundaryLoss: sdm of shape {tuple(sdm.shape)} does not match logits "
                             f"{tuple(logits.shape)}; expected (B, 1 or C-1, *spatial)")
        if sdm.shape[1] not in (1, max(1, n_classes - 1)):
            raise ValueError(f"BoundaryLoss: sdm has {sdm.shape[1]} channels for {n_classes} classes; "
                             f"expected 1 or {n_classes - 1}")
        if n_classes == 1:
            p_fg = torch.sigmoid(logits)
        elif sdm.shape[1] == 1:
            p_fg = 1.0 - logits.softmax(1)[:, :1]
        else:
            p_fg = logits.softmax(1)[:, 1:]
        return (p_fg * sdm.to(p_fg.dtype)).mean()


class RegionBoundaryLoss(nn.Module):
    """(1 - a) x Generalized Dice + Focal + a x Boundary, with a rising with the epoch.

    Kervadec et al. start with the regional loss alone (the boundary term gives a poor
    signal while predictions are far off) and move weight to the boundary term: here
    `a(epoch) = start + (end - start) * min(1, epoch / ramp_epochs)`.

    Args:
        boundary_weight_start: a at epoch 0.
        boundary_weight_end: a from `ramp_epochs` on.
        ramp_epochs: epochs of the linear ramp (0: `boundary_weight_end` from the start).
        regional: the regional loss (default `GeneralizedDiceFocalLoss()`).

    Raises:
        ValueError: a weight outside [0, 1] or `ramp_epochs` < 0.
    """

    def __init__(self, boundary_weight_start: float = 0.01, boundary_weight_end: float = 0.5,
                 ramp_epochs: int = 50, regional: nn.Module | None = None) -> None:
        super().__init__()
        for name, w in (("boundary_weight_start", boundary_weight_start),
                        ("boundary_weight_end", boundary_weight_end)):
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"{name} {w}; expected a weight in [0, 1]")
        if ramp_epochs < 0:
            raise ValueError(f"ramp_epochs {ramp_epochs}; expected >= 0")
        self.start, self.end, self.ramp_epochs = boundary_weight_start, boundary_weight_end, ramp_epochs
        self.regional = regional if regional is not None else GeneralizedDiceFocalLoss()
        self.boundary = BoundaryLoss()

    def alpha(self, epoch: float | None) -> float:
        """Weight of the boundary term at `epoch` (0-based; None: the final weight)."""
        if epoch is None or self.ramp_epochs == 0:
            return self.end
        return self.start + (self.end - self.start) * min(1.0, max(0.0, epoch) / self.ramp_epochs)

    def forward(self, logits: torch.Tensor | list[torch.Tensor], target: torch.Tensor,
                sdm: torch.Tensor, epoch: float | None = None) -> torch.Tensor:
        """logits (B, C, *spatial), or a deep-supervision list whose first element is the
        full-resolution output (the regional loss then being e.g. MONAI's
        `DeepSupervisionLoss`; the boundary term takes the first); target (B, 1, *spatial)
        labels; sdm as `BoundaryLoss`."""
        a = self.alpha(epoch)
        main = logits[0] if isinstance(logits, (list, tuple)) else logits
        return (1.0 - a) * self.regional(logits, target) + a * self.boundary(main, sdm)
