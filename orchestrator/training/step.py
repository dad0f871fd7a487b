"""One training step, shared by the trainer and the planner's memory estimate.

`Objective` (forward + loss) holds no data-dependent Python control flow, so the planner
can run it on FakeTensors and predict the bytes the trainer will use.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from orchestrator.config import StageSpec
from orchestrator.training.losses import GeneralizedDiceFocalLoss, RegionBoundaryLoss


def amp_dtype_for(device_type: str, amp: bool) -> torch.dtype | None:
    """bf16 where the device supports it, fp16 on older GPUs, None without AMP."""
    if not amp:
        return None
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Objective:
    """Forward pass and loss of one batch of a stage.

    3D family: (1 - a) x (Generalized Dice + Focal) + a x Boundary, the regional term
    through MONAI's DeepSupervisionLoss when the model returns auxiliary outputs, the
    boundary term (Kervadec) on the full-resolution output with the patch's signed
    distance map; a ramps from `boundary_weight_start` to `boundary_weight_end` over
    `boundary_ramp_epochs` (`RegionBoundaryLoss`). LCNN: Dice + cross-entropy on the
    centre slice plus the alignment loss, whose weight warms up linearly over
    `alignment_warmup_epochs`.
    """

    def __init__(self, spec: StageSpec) -> None:
        self.lcnn = spec.kind == "lcnn"
        base: nn.Module = (DiceCELoss(to_onehot_y=True, softmax=True) if self.lcnn
                           else GeneralizedDiceFocalLoss())
        self.seg_loss = DeepSupervisionLoss(base, weight_mode="exp")
        self.region_boundary: RegionBoundaryLoss | None = None
        if not self.lcnn and (spec.boundary_weight_start or spec.boundary_weight_end):
            self.region_boundary = RegionBoundaryLoss(
                spec.boundary_weight_start, spec.boundary_weight_end, spec.boundary_ramp_epochs,
                regional=self.seg_loss)
        self.alignment_weight = spec.alignment_weight
        self.warmup_epochs = spec.alignment_warmup_epochs

    def alignment_factor(self, epoch: float | None) -> float:
        if epoch is None or self.warmup_epochs == 0:
            return self.alignment_weight
        return self.alignment_weight * min(1.0, (epoch + 1) / self.warmup_epochs)

    @property
    def needs_sdm(self) -> bool:
        """Whether batches must carry the labels' signed distance maps (`sdm`)."""
        return self.region_boundary is not None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 amp_dtype: torch.dtype | None, device_type: str,
                 epoch: int | None = None, sdm: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of a batch: x (B, C, ...) and integer labels y (B, ...), under autocast;
        sdm (B, 1, ...) the labels' signed distance maps when `needs_sdm`.

        Raises:
            ValueError: `needs_sdm` and no sdm given.
        """
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x, return_aux=True) if self.lcnn else model(x)
        aux = None
        if self.lcnn:
            out, aux = out
        out = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        # float labels: DeepSupervisionLoss resizes them with nearest-exact, which has no
        # int64 kernel; the losses turn them back into class indices
        if self.region_boundary is not None:
            if sdm is None:
                raise ValueError("Objective: the boundary loss needs the batch's signed distance "
                                 "maps (sdm); expected a (B, 1, *spatial) tensor")
            loss = self.region_boundary(out, y.unsqueeze(1).float(), sdm, epoch)
        else:
            loss = self.seg_loss(out, y.unsqueeze(1).float())
        if aux is not None:
            from models.sean import alignment_loss

            loss = loss + self.alignment_factor(epoch) * alignment_loss(aux)
        return loss


def estimation_step(spec: StageSpec, amp: bool) -> Callable[..., None]:
    """The step the planner measures: forward, loss, backward, clip, optimizer step."""
    objective = Objective(spec)
    amp_dtype = amp_dtype_for("cpu", amp)  # estimates run on CPU fake tensors

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        # the batch's distance maps are live during the step: count them
        sdm = torch.zeros(x.shape[:1] + (1,) + x.shape[2:]) if objective.needs_sdm else None
        objective(model, x, y, amp_dtype, "cpu", sdm=sdm).backward()
        if spec.grad_clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
