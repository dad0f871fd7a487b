"""Peak memory of one training step, predicted without running it on the target device.

The real step (forward, loss, backward, optimizer step, with the optimizer state
allocated beforehand as from the second step on) runs on CPU FakeTensors: shapes and
dtypes only, no arithmetic. A
TorchDispatchMode adds up the bytes of live storages (rounded like the CUDA caching
allocator) and keeps the peak. For a CUDA target, CPU autocast's low-precision ops that
CUDA autocast runs in fp32 are promoted, so the estimate sees CUDA's dtypes.

What the tensor count cannot see (CUDA context, cuDNN workspace, the allocator's
reserved-minus-allocated gap, the process's own baseline on CPU) is added by
`plan_facts.OverheadsRecord`, each term configurable and reported; docs/benchmarks.md ("Planner")
has what was measured.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from orchestrator.errors import PlanError
from orchestrator.plan_facts import OverheadsRecord

GIB = 1024**3
StepFn = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], None]


# Validation: sliding-window inference over whole volumes (training/validation.py uses
# these); ATLAS R2.0's volume when the plan has no dataset to measure.
class SlidingWindow(TypedDict):
    """sliding_window_inference's settings, as validation and the planner use them."""

    sw_batch_size: int
    overlap: float
    mode: str


SLIDING_WINDOW: SlidingWindow = {"sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"}
ATLAS_SHAPE_VOX = (197, 233, 189)

# CPU: a fresh `plan --verify` trial holds 0.36 GB before its first tensor (torch, MONAI
# and the models imported); a stage training in the demo held 0.50 GB besides its
# tensors (its data, loader and validation). With glibc's heap bounded
# (planning/cpu_heap.py: what a stage on the CPU and the trial run with), the peak RSS
# exceeded baseline + live-tensor peak by 4.3-6.0 % of that peak (stages 1, 2 and the
# LCNN of a 4 GB plan; unbounded it was 16-41 % here and 40-48 % on an Intel Xeon,
# docs/benchmarks.md, "Planner: CPU plans within budget"). The terms are upper bounds: the
# trainer's baseline and about twice the gap measured, so that a first plan on a new
# machine does not exceed its budget. `plan --verify` measures each stage and stores
# measured/predicted, which later plans on the same hardware apply (calibration.py).
DEFAULT_OVERHEADS = {
    "cuda": OverheadsRecord(alloc_fraction=0.10, workspace_gb=0.5, context_gb=0.6),
    "cpu": OverheadsRecord(alloc_fraction=0.10, workspace_gb=0.0, context_gb=0.50),
}


# batch-free bytes besides parameter-sized tensors, in `FakeStep.batch_free_bytes`
BATCH_FREE_SLACK = 64 * 2**20


class LivePeak(TorchDispatchMode):
    """Bytes of live storages created inside this mode, and their peak."""

    def __init__(self, round_to: int = 512) -> None:
        super().__init__()
        self.round_to = round_to
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def live(self) -> Iterator[tuple[Any, int]]:
        """(storage, counted bytes) of every live storage."""
        for storage in list(self._seen.keys()):
            nbytes = -(-storage.nbytes() // self.round_to) * self.round_to
            yield storage, nbytes

    def _track(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage not in self._seen:
            nbytes = -(-storage.nbytes() // self.round_to) * self.round_to
            self._seen[storage] = weakref.ref(storage, lambda _r: self._release(nbytes))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is _PRIM_DEVICE and isinstance(args[0], FakeTensor):
            # asked of every fake argument of most ops (a tenth of a fake step's time):
            # answered as FakeTensor's own handler does, allocating nothing
            return _META if args[0].fake_mode.in_kernel_invocation else args[0].fake_device
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self._track(out)
        else:
            tree_map_only(torch.Tensor, self._track, out)
        return out


_PRIM_DEVICE = torch.ops.prim.device.default
_META = torch.device("meta")


_LOW = (torch.float16, torch.bfloat16)
_FP32_WITH_DTYPE = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
                    torch.Tensor.softmax, torch.Tensor.log_softmax, torch.sum, torch.Tensor.sum,
                    torch.cumsum, torch.Tensor.cumsum}
_FP32 = {F.layer_norm, F.group_norm, F.instance_norm, torch.layer_norm, torch.group_norm,
         torch.instance_norm, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
         torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.norm}


class CudaAutocastDtypes(TorchFunctionMode):
    """Run the ops CUDA autocast keeps in fp32 in fp32 under CPU autocast, too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        first = args[0] if args else None
        if (torch.is_autocast_enabled("cpu") and isinstance(first, torch.Tensor)
                and first.dtype in _LOW):
            if func in _FP32_WITH_DTYPE and kwargs.get("dtype") is None:
                kwargs["dtype"] = torch.float32
            elif func in _FP32:
                def up(t: Any) -> Any:
                    return t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW else t
                args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


class ConstantArange(TorchFunctionMode):
    """`torch.arange` of Python ints is a constant, not data: compute it for real.

    MONAI's losses build reduction axes with `torch.arange(2, ndim).tolist()`, which
    fake tensors cannot answer; a real (tiny) tensor can, and the fake mode accepts it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.arange and all(type(a) is int for a in args) and "device" not in kwargs:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _fakeify(model: nn.Module) -> nn.Module:
    """Replace parameters and buffers by fresh (fake, under FakeTensorMode) tensors."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                     p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return model.train()


@dataclass(frozen=True)
class StepEstimate:
    tensor_bytes: int
    seconds: float


def prime_adamw(opt: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state as its first step would, without running that step.

    Every later step holds the state throughout, so one step after this has the peak of
    the second real step (the first step's peak is never higher) at half the cost.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def make_optimizer(params: Any, cuda_target: bool) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it on the target: PyTorch's default there is the
    foreach implementation on CUDA (all parameters' temporaries at once) and the
    per-tensor loop on the CPU, and their peaks differ."""
    return torch.optim.AdamW(params, lr=1e-3, foreach=cuda_target)


class FakeStep:
    """A model with its optimizer state on fake tensors, kept for step estimates at several
    batch sizes (the planner's batch search) and for validation's.

    The model is built on the meta device and given fake parameters; AdamW's state is
    allocated as from the second step on. The first `peak()` runs the whole step and
    records how far the optimizer step rises above what is live when it begins: a
    function of the parameters alone. Later estimates run forward and backward (and the
    gradient clipping) and add that rise at the optimizer step instead of running it
    again: the same peak (tests/test_planner.py), at about two thirds of the cost.

    Raises (constructor, `peak`, `eval_peak`):
        PlanError: an op of the model or the step cannot run on fake tensors (named).
    """

    def __init__(self, build_model: Callable[[], nn.Module], cuda_target: bool,
                 cuda_dtypes: bool | None = None, tracker: LivePeak | None = None,
                 rises: dict[tuple, int] | None = None) -> None:
        """`rises`: optimizer-step rises already measured, by the optimizer's parameters'
        shapes and dtypes (the rise depends on nothing else); this session's is read from
        it and added to it, so that another configuration with the same parameters (with
        and without checkpointing; a CNN at another input size) does not run the optimizer
        step again."""
        self.cuda_target = cuda_target
        # CUDA autocast's fp32 ops are emulated at the function level, which checkpoint's
        # recomputation in backward does not see: the planner turns it off there
        self.cuda_dtypes = cuda_target if cuda_dtypes is None else cuda_dtypes
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.tracker = tracker or LivePeak()
        self.opt_rise: int | None = None
        try:
            with torch.device("meta"):
                model = build_model()
            with self._modes():
                self.model = _fakeify(model)
                self.opt = make_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                          cuda_target)
                prime_adamw(self.opt)
        except Exception as err:
            raise PlanError(f"memory estimate failed building the model: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
        self.held = self.tracker.current  # parameters and optimizer state
        params = [p for group in self.opt.param_groups for p in group["params"]]
        self._rise_key = (type(self.opt).__name__, cuda_target,
                          tuple((tuple(p.shape), p.dtype) for p in params))
        self.rises = rises
        if rises is not None and self._rise_key in rises:
            self.opt_rise = rises[self._rise_key]

    @contextlib.contextmanager
    def _modes(self, cuda_dtypes: bool | None = None) -> Iterator[None]:
        emulate = self.cuda_dtypes if cuda_dtypes is None else cuda_dtypes
        policy = CudaAutocastDtypes() if emulate else contextlib.nullcontext()
        with self.mode, self.tracker, policy, ConstantArange():
            yield

    def _optimizer_step(self) -> Callable[..., Any]:
        """The optimizer's step for this estimate: the real one, measuring its rise, the
        first time; afterwards that rise, added to what is live."""
        tracker, real = self.tracker, type(self.opt).step.__get__(self.opt)

        if self.opt_rise is not None:
            rise = self.opt_rise

            def emulated(*args: Any, **kwargs: Any) -> None:
                tracker.peak = max(tracker.peak, tracker.current + rise)
            return emulated

        def measured(*args: Any, **kwargs: Any) -> Any:
            before, start = tracker.peak, tracker.current
            tracker.peak = start
            out = real(*args, **kwargs)
            self.opt_rise = tracker.peak - start
            if self.rises is not None:
                self.rises[self._rise_key] = self.opt_rise
            tracker.peak = max(before, tracker.peak)
            return out
        return measured

    def peak(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], step_fn: StepFn) -> int:
        """Peak live-tensor bytes of one training step on a batch of these shapes."""
        try:
            with self._modes():
                x = torch.empty(x_shape)
                y = torch.zeros(y_shape, dtype=torch.long)
                self.tracker.peak = self.tracker.current
                self.opt.step = self._optimizer_step()  # type: ignore[method-assign]
                try:
                    step_fn(self.model.train(), self.opt, x, y)
                finally:
                    del self.opt.step
                del x, y
        except Exception as err:  # the fake mode's own errors name the op that failed
            raise PlanError(f"memory estimate failed for input {tuple(x_shape)}: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
        return self.tracker.peak

    def batch_free_bytes(self) -> int:
        """An upper bound of the bytes live at any moment of a step that do not grow with
        the batch: the parameters and optimizer state (`held`), gradients and any other
        parameter-sized copy (at most `held` again), the optimizer step's rise, and
        `BATCH_FREE_SLACK` for the rest (loss scalars, norms, attention tables). Known
        once this session has estimated a step (the rise is measured then)."""
        assert self.opt_rise is not None, "estimate a step first"
        return 2 * self.held + self.opt_rise + BATCH_FREE_SLACK

    def eval_peak(self, roi_vox: tuple[int, ...], volume_vox: tuple[int, ...], in_channels: int,
                  amp_dtype: torch.dtype | None) -> int:
        """Peak live-tensor bytes of validating one whole volume as `training/validation.py`
        does (MONAI's sliding window, then the argmax), with the model's parameters and
        AdamW state held (as between training epochs; gradients are freed); CUDA's
        autocast dtypes where the target is a GPU. Checkpointing does not act without
        gradients, so any session of the same window and filters serves.

        The sliding window runs over the volume cut to at most three windows per axis (its
        per-window cost does not change with more windows, and MONAI's loop over hundreds
        of windows on fake tensors would take seconds); the volume-sized buffers (input,
        logits and count map in fp32 while the windows run; input, logits and the int64
        argmax after) are then counted for the real volume. Equal to the full run to the
        byte at 197x233x189 with a 32^3 window (tests/test_planner.py checks a real run).
        """
        stride = [max(1, int(r * (1 - float(SLIDING_WINDOW["overlap"])))) for r in roi_vox]
        cut = tuple(min(v, r + 2 * s) for v, r, s in zip(volume_vox, roi_vox, stride))
        tracker = self.tracker
        try:
            with self._modes(cuda_dtypes=self.cuda_target):
                held = tracker.current  # parameters and optimizer state
                tracker.peak = held
                x = torch.empty(1, in_channels, *cut)
                with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype or torch.float32,
                                                     enabled=amp_dtype is not None, cache_enabled=False):
                    # the Gaussian weights' values do not matter here, their size does
                    # cast: the predictor returns one tensor, so the windows stitch into one
                    out = cast(torch.Tensor, sliding_window_inference(x, tuple(roi_vox),
                                                   predictor=_FirstBatches(self.model.eval()),
                                                   roi_weight_map=torch.empty(roi_vox), **SLIDING_WINDOW))
                windows_peak, n_classes = tracker.peak, int(out.shape[1])
                out.argmax(1)
                del x, out
        except Exception as err:
            raise PlanError(f"validation memory estimate failed for window {tuple(roi_vox)}: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
        if cut == tuple(volume_vox):
            return tracker.peak
        voxels = math.prod(volume_vox)
        windows = windows_peak + (voxels - math.prod(cut)) * 4 * (in_channels + n_classes + 1)
        labels = held + voxels * 4 * (in_channels + n_classes) + voxels * 8
        return max(windows, labels)


def estimate_step_peak(build_model: Callable[[], nn.Module], x_shape: tuple[int, ...],
                       y_shape: tuple[int, ...], step_fn: StepFn, *, cuda_target: bool) -> StepEstimate:
    """Peak live-tensor bytes of a training step of the model `build_model()` makes,
    with the optimizer state present (as from the second step on).

    Args:
        build_model: builds the model (called on the meta device: no memory, no init cost).
        x_shape: the input batch's shape; y_shape: the label batch's shape (int64).
        step_fn: one real training step `step_fn(model, optimizer, x, y)`; it must avoid
            data-dependent Python control flow (`.item()`, `if t.any()`).
        cuda_target: emulate CUDA autocast's fp32 ops and CUDA's foreach AdamW.

    Raises:
        PlanError: an op of the model or the step cannot run on fake tensors (named).
    """
    t0 = time.perf_counter()
    peak = FakeStep(build_model, cuda_target).peak(x_shape, y_shape, step_fn)
    return StepEstimate(peak, time.perf_counter() - t0)


class _FirstBatches(nn.Module):
    """Runs the model on the first `n` window batches, then returns uninitialised outputs
    of the same shape: every batch's forward needs the same memory, and by the second the
    volume-sized buffers exist, so the peak is seen without running every window."""

    def __init__(self, model: nn.Module, n: int = 2) -> None:
        super().__init__()
        self.model, self.left = model, n
        self.out_shape: tuple[tuple[int, ...], torch.dtype] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left > 0 or self.out_shape is None:
            self.left -= 1
            out = self.model(x)
            self.out_shape = (tuple(out.shape[1:]), out.dtype)
            return out
        shape, dtype = self.out_shape
        return torch.empty((x.shape[0], *shape), dtype=dtype)


def estimate_eval_peak(build_model: Callable[[], nn.Module], roi_vox: tuple[int, ...],
                       volume_vox: tuple[int, ...], in_channels: int,
                       amp_dtype: torch.dtype | None, *, cuda_target: bool) -> StepEstimate:
    """`FakeStep.eval_peak` of a fresh model (see there)."""
    t0 = time.perf_counter()
    peak = FakeStep(build_model, cuda_target).eval_peak(roi_vox, volume_vox, in_channels, amp_dtype)
    return StepEstimate(peak, time.perf_counter() - t0)
