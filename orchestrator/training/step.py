"""One training step, shared by the trainer and the planner's memory estimate.

`forward_backward` holds no data-dependent Python control flow, so the planner can run
it on FakeTensors and predict the bytes the trainer will use.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from orchestrator.config import StageSpec
from orchestrator.training.losses import GeneralizedDiceFocalLoss

LossFn = Callable[[torch.Tensor | list[torch.Tensor], torch.Tensor], torch.Tensor]


def build_loss(spec: StageSpec) -> LossFn:
    """The stage's loss: logits (or a deep-supervision list) and labels (B, 1, ...) -> scalar."""
    if spec.kind == "lcnn":
        base: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
    else:
        base = GeneralizedDiceFocalLoss()
    return DeepSupervisionLoss(base, weight_mode="exp")


def amp_dtype_for(device_type: str, amp: bool) -> torch.dtype | None:
    """bf16 where the device supports it, fp16 on older GPUs, None without AMP."""
    if not amp:
        return None
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                 amp_dtype: torch.dtype | None, device_type: str) -> torch.Tensor:
    """Forward pass and loss under autocast (labels y are (B, ...) int64)."""
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(x)
    if isinstance(out, (list, tuple)):
        out = [o.float() for o in out]
    else:
        out = out.float()
    # float labels: DeepSupervisionLoss resizes them with nearest-exact, which has no int64
    # kernel; the losses turn them back into class indices
    return loss_fn(out, y.unsqueeze(1).float())


def estimation_step(spec: StageSpec, amp: bool) -> Callable[..., None]:
    """The step the planner measures: forward, loss, backward, clip, optimizer step."""
    loss_fn = build_loss(spec)
    amp_dtype = amp_dtype_for("cpu", amp)  # estimates run on CPU fake tensors

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = forward_loss(model, x, y, loss_fn, amp_dtype, "cpu")
        loss.backward()
        if spec.grad_clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
