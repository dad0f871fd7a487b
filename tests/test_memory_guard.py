"""The GPU memory guard: accumulation keeps the batch's gradient; the CPU is untouched;
on a GPU the plan's budget binds the allocator."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.training.memory_guard import limit_gpu_memory
from orchestrator.training.step import AccumulatingObjective


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).squeeze(1) - y).square().mean()


def _grads(objective, micro: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(6, 6), torch.randn(6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    obj = AccumulatingObjective(objective, micro, scaler) if micro > 1 else objective
    loss = obj(model, x, y)
    scaler.scale(loss).backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro", [2, 3, 4])  # 4 chunks of 6: sizes 2, 2, 2 (chunk rounds up)
def test_accumulation_gives_the_whole_batch_gradient(micro: int) -> None:
    whole_loss, whole = _grads(_mse, 1)
    loss, parts = _grads(_mse, micro)
    assert loss == pytest.approx(float(whole_loss), rel=1e-5)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_is_left_alone() -> None:
    """No allocator limit on the CPU (every trainer test runs its steps through the guard)."""
    assert limit_gpu_memory(20.0, 0.6, torch.device("cpu")) is None


@pytest.mark.gpu
def test_budget_binds_the_cuda_allocator() -> None:
    device = torch.device("cuda")
    msg = limit_gpu_memory(1.5, 0.5, device)
    assert msg is not None and "CUDA allocator limited to 1.0 GB" in msg
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(1.2 * 1024**3), dtype=torch.uint8, device=device)
        torch.empty(int(0.5 * 1024**3), dtype=torch.uint8, device=device)  # within the budget
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
