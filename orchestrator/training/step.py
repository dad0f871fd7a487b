"""One training step for every caller and device (`TrainStep`), and its objective.

The trainer, the planner's memory estimate, `plan --verify`'s trial and the benches all
run `TrainStep`; what differs by device is an argument. `Objective` (forward + loss)
holds no data-dependent Python control flow, and the step's finiteness checks treat a
fake tensor as finite, so the planner runs this very code on FakeTensors and predicts the
bytes the trainer will use.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from models.sean import alignment_loss
from orchestrator.config import ResUNetOptions, StageSpec
from orchestrator.training.losses import GeneralizedDiceFocalLoss, RegionBoundaryLoss


def amp_dtype_for(device_type: str, amp: bool, prefer: str = "auto") -> torch.dtype | None:
    """None without AMP; else `prefer` (bf16 or fp16), or with auto bf16 where the device
    supports it and fp16 on older GPUs."""
    if not amp:
        return None
    if prefer == "fp16" or (prefer == "auto" and device_type == "cuda"
                            and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def lcnn_dice_ce(spec: StageSpec) -> DiceCELoss:
    """LCNN's Dice + cross-entropy: the Dice term over every class or the foreground only
    (`dice_include_background`), the cross-entropy weighted per class (`class_weights`;
    MONAI's own `weight` would weight the Dice term too)."""
    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=spec.dice_include_background)
    if spec.class_weights is not None:
        # add_module: the same replacement as an assignment, which mypy refuses as MONAI types
        # the attribute nn.CrossEntropyLoss
        loss.add_module("cross_entropy", WeightedCrossEntropy(spec.class_weights))
    return loss


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with class weights made on the logits' device at each call (so one
    loss serves the CPU, a GPU and the planner's fake tensors)."""

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.weights = [float(w) for w in weights]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(self.weights, device=logits.device, dtype=logits.dtype)
        return nn.functional.cross_entropy(logits, target, weight=w)


class Objective:
    """Forward pass and loss of one batch of a stage.

    3D family: (1 - a) x (Generalized Dice + Focal) + a x Boundary, the regional term
    through MONAI's DeepSupervisionLoss when the model returns auxiliary outputs
    (`deep_supervision_weights`, else 1, 0.5, 0.25, ...; focal `focal_gamma`, `focal_alpha`), the
    boundary term (Kervadec) on the full-resolution output with the patch's signed
    distance map; a ramps from `boundary_weight_start` to `boundary_weight_end` over
    `boundary_ramp_epochs` (`RegionBoundaryLoss`). LCNN: Dice + cross-entropy on the
    centre slice plus the alignment loss, whose weight warms up linearly over
    `alignment_warmup_epochs`.
    """

    def __init__(self, spec: StageSpec) -> None:
        self.lcnn = spec.kind == "lcnn"
        base: nn.Module = (lcnn_dice_ce(spec) if self.lcnn
                           else GeneralizedDiceFocalLoss(spec.focal_gamma, alpha=spec.focal_alpha))
        weights = list(spec.deep_supervision_weights) if spec.deep_supervision_weights else None
        # MONAI annotates `loss` as torch's _Loss, but only calls it: any nn.Module loss works
        self.seg_loss = DeepSupervisionLoss(base, weight_mode="exp", weights=weights)  # type: ignore[arg-type]
        self.region_boundary: RegionBoundaryLoss | None = None
        if not self.lcnn and (spec.boundary_weight_start or spec.boundary_weight_end):
            self.region_boundary = RegionBoundaryLoss(
                spec.boundary_weight_start, spec.boundary_weight_end, spec.boundary_ramp_epochs,
                regional=self.seg_loss)
        self.alignment_weight = spec.alignment_weight
        self.warmup_epochs = spec.alignment_warmup_epochs
        m = spec.model  # only the 3D family has auxiliary heads
        heads = m.deep_supervision_heads if isinstance(m, ResUNetOptions) and m.deep_supervision else 0
        self.ds_weights = self.seg_loss.get_weights(heads + 1)  # full-resolution first

    def set_aux_scale(self, scale: float) -> None:
        """Scale the auxiliary (deep-supervision) outputs' loss weights, the full-resolution
        one kept: deep-supervision heads that a hand-off added start at zero, so their loss
        is that of a blank prediction, and at full weight it more than doubled the loss and
        pulled the decoder away from the handed-off function (the trainer ramps it in)."""
        self.seg_loss.weights = [self.ds_weights[0]] + [w * scale for w in self.ds_weights[1:]]

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
            loss = loss + self.alignment_factor(epoch) * alignment_loss(aux)
        return loss


class AccumulatingObjective:
    """The stage's objective over `micro` chunks of each batch: all chunks but the last
    are backpropagated here, the last is returned for the step's own backward, and the
    value is the batch's size-weighted mean loss, so gradients sum as for the whole batch."""

    def __init__(self, inner: Callable[..., torch.Tensor], micro: int, scaler: Any) -> None:
        self.inner, self.micro, self.scaler = inner, micro, scaler

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 *args: Any, sdm: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        sdms = sdm.chunk(self.micro) if sdm is not None else (None,) * self.micro
        parts = list(zip(x.chunk(self.micro), y.chunk(self.micro), sdms))

        def loss(xi: torch.Tensor, yi: torch.Tensor, si: torch.Tensor | None) -> torch.Tensor:
            extra = {"sdm": si} if si is not None else {}  # the distance maps' chunk too
            return self.inner(model, xi, yi, *args, **extra, **kwargs) * (len(xi) / len(x))

        done = torch.zeros((), device=x.device)
        for part in parts[:-1]:
            value = loss(*part)
            self.scaler.scale(value).backward()
            done = done + value.detach()
        return loss(*parts[-1]) + done


def _finite(t: torch.Tensor) -> bool:
    """Whether a loss or gradient norm is finite. A fake tensor (the planner's estimate)
    has shape but no value: it counts as finite, so the estimate runs this very code."""
    if isinstance(t, FakeTensor):
        return True
    return bool(torch.isfinite(t).all())


@dataclass
class StepResult:
    """What a step did: its loss (detached), and why it was skipped (None: applied)."""

    loss: torch.Tensor
    skipped: Literal["loss", "gradient"] | None = None


class TrainStep:
    """One training step, the same for every caller and device: the trainer, the
    planner's memory estimate (on CPU fake tensors), `plan --verify`'s trial and the
    benches all run it.

    Forward and loss under autocast (with the batch's signed distance maps for the
    boundary term), over `micro` chunks of the batch where gradients are accumulated;
    backward through the GradScaler (active only with fp16); unscale; clip; optimizer
    step; gradients freed. What differs between devices is an argument: the device type
    (autocast), the AMP dtype (bf16, or fp16 with its scaler on GPUs without bf16) and
    `synchronize` (wait for the device before returning, for timings).

    A non-finite loss skips the step; so does a non-finite gradient norm without a
    scaler (with fp16 the scaler skips it and lowers its scale). `agree` (DDP: the ranks'
    agreement, training/distributed.py) turns a loss non-finite where it is non-finite on
    any rank, so that every rank skips the same steps.

    The objective is wrapped here and nowhere else: over `micro` chunks in `loss()`
    (memory_guard's fallback only raises `micro`); under DDP the caller passes the DDP
    module as the model, which the objective runs as any other.
    """

    def __init__(self, objective: Callable[..., torch.Tensor], device_type: str,
                 amp_dtype: torch.dtype | None, grad_clip_norm: float | None = None, *,
                 micro: int = 1, synchronize: bool = False,
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.objective, self.device_type, self.amp_dtype = objective, device_type, amp_dtype
        self.grad_clip_norm, self.micro, self.synchronize = grad_clip_norm, micro, synchronize
        self.agree = agree
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)

    @classmethod
    def for_stage(cls, spec: StageSpec, device_type: str, amp: bool, *,
                  micro: int | None = None, synchronize: bool = False,
                  agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainStep:
        """The step of a stage on a device: its objective, clip norm and accumulation."""
        return cls(Objective(spec), device_type, amp_dtype_for(device_type, amp, spec.amp_dtype),
                   spec.grad_clip_norm, micro=spec.grad_accum_steps if micro is None else micro,
                   synchronize=synchronize, agree=agree)

    @property
    def needs_sdm(self) -> bool:
        return bool(getattr(self.objective, "needs_sdm", False))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             sdm: torch.Tensor | None, epoch: int | None) -> torch.Tensor:
        """The batch's loss; with `micro` > 1 every chunk but the last is already
        backpropagated (memory_guard's fallback raises `micro` after an OOM)."""
        objective = self.objective
        if self.micro > 1:
            objective = AccumulatingObjective(objective, self.micro, self.scaler)
        loss = objective(model, x, y, self.amp_dtype, self.device_type, epoch, sdm=sdm)
        return self.agree(loss) if self.agree is not None else loss

    def __call__(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, sdm: torch.Tensor | None = None,
                 epoch: int | None = None) -> StepResult:
        """Train on one batch: x (B, C, ...), integer labels y (B, ...), sdm (B, 1, ...)."""
        loss = self.loss(model, x, y, sdm, epoch)
        if not _finite(loss):
            opt.zero_grad(set_to_none=True)
            return StepResult(loss.detach(), "loss")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm or float("inf"))
        if not self.scaler.is_enabled() and not _finite(grad_norm):
            opt.zero_grad(set_to_none=True)
            return StepResult(loss.detach(), "gradient")
        self.scaler.step(opt)  # fp16 and a non-finite gradient: skipped, the scale lowered
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        if self.synchronize and self.device_type == "cuda":
            torch.cuda.synchronize()
        return StepResult(loss.detach())


def sdm_placeholder(step: TrainStep, x: torch.Tensor) -> torch.Tensor | None:
    """Distance maps of the batch's shape where the step needs them (their values do not
    matter to memory or time: the estimate, the trial and the benches use this)."""
    if not step.needs_sdm:
        return None
    return torch.zeros(x.shape[:1] + (1,) + x.shape[2:], device=x.device)


def estimation_step(spec: StageSpec, amp: bool) -> Callable[..., None]:
    """The step the planner measures on CPU fake tensors: `TrainStep` itself, one
    backward pass per step (the planner's batch is per backward pass). fp16 is estimated
    as bf16 (the same bytes): fp16's GradScaler reads its found-inf flag as a value,
    which a fake tensor has not, and holds only a few scalars."""
    step = TrainStep.for_stage(spec.model_copy(update={"amp_dtype": "bf16"}), "cpu", amp, micro=1)

    def run(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        step(model, opt, x, y, sdm=sdm_placeholder(step, x))  # the batch's maps are live: counted

    return run
