"""Stage hand-off: start a bigger member of the model family from a smaller one's weights.

Net2Net-style (Chen et al., 2016): tensors whose name and shape match are copied; tensors
whose channel spaces grew are widened by replicating units (new unit j copies old unit
`map[j]`, a fixed function of j) and dividing the inputs read from replicated units by
their replication count, so that the wider network computes the same function; the
position embedding of the bottleneck transformer is resampled to the new token grid;
new residual branches get a zero last layer, so they start as the identity.

Symmetry between replicas is broken by zero-sum noise on the divided input weights: the
copies of one unit carry identical activations, so any noise that sums to zero over them
leaves the function unchanged (up to float rounding) while giving the replicas different
gradients.

The channel spaces come from the model's `handoff_spec()` (see `models.blocks.tag`); a
model without one is transferred by name and shape only.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.transformer import resize_pos_embed
from orchestrator.errors import CheckpointError
from orchestrator.training.checkpoints import model_from_checkpoint

logger = logging.getLogger(__name__)

_EMPTY_SPEC: dict[str, Any] = {"tensors": {}, "space_groups": {}, "pos_embeds": {},
                               "branch_last_layers": []}


@dataclass(frozen=True)
class SpaceMap:
    """How the units of one channel space of the new model map onto the old model's.

    Attributes:
        full: (new width,) old unit of each new unit.
        full_counts: (old width,) how many new units copy each old unit.
        within: (new group width,) old within-group index of each new within-group index.
        within_counts: (old group width,) replication counts inside one group.
    """

    full: torch.Tensor
    full_counts: torch.Tensor
    within: torch.Tensor
    within_counts: torch.Tensor


def space_map(old_width: int, new_width: int, old_groups: int = 1,
              new_groups: int = 1) -> SpaceMap | None:
    """The Net2Net unit mapping of one channel space, or None if it cannot preserve function.

    New unit j lies in group g = j // w_new at index k = j % w_new; it copies unit
    k % w_old of old group g * old_groups // new_groups. Every new group therefore holds a
    full copy of the old group it descends from, which is what a grouped conv needs to
    compute the old (possibly dense) conv's outputs.

    Args:
        old_width, new_width: channels of the space in the old and the new model.
        old_groups, new_groups: conv groups acting on the space (1: dense).

    Returns:
        The mapping, or None when the space shrank, the groups do not nest (new_groups not a
        multiple of old_groups) or a new group is narrower than an old one.
    """
    if old_width % old_groups or new_width % new_groups or new_groups % old_groups:
        return None
    w_old, w_new = old_width // old_groups, new_width // new_groups
    if w_new < w_old or new_width < old_width:
        return None
    j = torch.arange(new_width)
    g_old = (j // w_new) * old_groups // new_groups
    full = g_old * w_old + (j % w_new) % w_old
    within = torch.arange(w_new) % w_old
    return SpaceMap(full, torch.bincount(full, minlength=old_width),
                    within, torch.bincount(within, minlength=w_old))


def _spec(model: nn.Module) -> dict[str, Any]:
    fn = getattr(model, "handoff_spec", None)
    return fn() if callable(fn) else _EMPTY_SPEC


def _space_maps(old_spec: dict[str, Any], new_spec: dict[str, Any],
                old_sd: dict[str, torch.Tensor],
                new_sd: dict[str, torch.Tensor]) -> dict[str, SpaceMap | None]:
    """Width of every channel space in both models (read off an "out" dimension) -> map."""

    def widths(spec: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, dims in spec["tensors"].items():
            for d, entry in enumerate(dims):
                if entry is not None and entry[1] == "out" and name in sd:
                    out.setdefault(entry[0], int(sd[name].shape[d]))
        return out

    old_w, new_w = widths(old_spec, old_sd), widths(new_spec, new_sd)
    maps: dict[str, SpaceMap | None] = {}
    for space, width in new_w.items():
        if space in old_w:
            maps[space] = space_map(old_w[space], width, old_spec["space_groups"].get(space, 1),
                                    new_spec["space_groups"].get(space, 1))
    return maps


def _zero_sum_noise(shape: torch.Size, dim: int, index: torch.Tensor, n_groups: int,
                    scale: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise whose sum over the entries of `dim` sharing an `index` value is 0."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    sums_shape = list(shape)
    sums_shape[dim] = n_groups
    sums = torch.zeros(sums_shape, dtype=torch.float64).index_add_(dim, index, noise)
    counts = torch.bincount(index, minlength=n_groups).to(torch.float64)
    view = [1] * len(shape)
    view[dim] = n_groups
    mean = sums / counts.clamp(min=1).view(view)
    return noise - mean.index_select(dim, index)


def widen_tensor(src: torch.Tensor, shape: torch.Size, dims: tuple | None,
                 maps: dict[str, SpaceMap | None], noise_std: float,
                 gen: torch.Generator) -> torch.Tensor | None:
    """Widen one old tensor to `shape` along its tagged dimensions.

    Args:
        src: the old tensor.
        shape: the new tensor's shape.
        dims: per-dimension (space, role) tags of the new tensor (None: untagged).
        maps: space -> mapping (None: the space cannot be widened).
        noise_std: zero-sum noise on divided inputs, relative to src's std.
        gen: the seeded generator for that noise.

    Returns:
        The widened tensor, or None if it cannot be derived from src (it is then new).
    """
    if dims is None or len(dims) != src.dim() or len(shape) != src.dim():
        return None
    if not src.is_floating_point():
        return None
    out = src.detach().to(torch.float64)
    scale = noise_std * float(src.float().std()) if src.numel() > 1 else 0.0
    for d, entry in enumerate(dims):
        smap = maps.get(entry[0]) if entry is not None else None
        if smap is None:
            if out.shape[d] != shape[d]:
                return None
            continue
        role = entry[1]
        idx, counts = ((smap.within, smap.within_counts) if role == "in_grouped"
                       else (smap.full, smap.full_counts))
        if out.shape[d] != counts.numel() or idx.numel() != shape[d]:
            return None
        out = out.index_select(d, idx)
        if role in ("in", "in_grouped"):
            view = [1] * out.dim()
            view[d] = idx.numel()
            out = out / counts.index_select(0, idx).to(out.dtype).view(view)
            if scale > 0:
                out = out + _zero_sum_noise(out.shape, d, idx, counts.numel(), scale, gen)
    return out.to(src.dtype) if tuple(out.shape) == tuple(shape) else None


def transfer_weights(old_model: nn.Module, new_model: nn.Module, probe_shape: tuple[int, ...],
                     noise_std: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Initialise `new_model` in place from `old_model` and report what happened to each tensor.

    Args:
        old_model: the previous stage's model (not modified; its mode is restored).
        new_model: the next stage's model, freshly built.
        probe_shape: (batch, channels, x, y, z) of the probe input, normally the old
            stage's input size.
        noise_std: symmetry-breaking noise on replicated units, relative to each tensor's
            std; it sums to zero over the replicas, so the function is unchanged.
        seed: seeds the noise and the probe input.

    Returns:
        A JSON-able dict: "tensors" {name: "copied" | "widened" | "interpolated" | "new" |
        "dropped"} covering every tensor of the new state_dict (and old ones it lacks),
        "counts" per status, "zeroed" (parameters zeroed so new branches start as the
        identity), "max_output_diff" (max |new(x) - old(x)| in eval mode on a seeded
        probe x), "output_scale" (max |old(x)|), "relative_output_diff" (their ratio),
        "probe_shape", "noise_std", "seed".

    Raises:
        ValueError: the probe shape is not a valid input of either model.
    """
    old_sd = {k: v.detach().cpu() for k, v in old_model.state_dict().items()}
    new_sd = {k: v.detach().cpu() for k, v in new_model.state_dict().items()}
    old_spec, new_spec = _spec(old_model), _spec(new_model)
    maps = _space_maps(old_spec, new_spec, old_sd, new_sd)
    gen = torch.Generator().manual_seed(seed)
    status: dict[str, str] = {}
    loaded: dict[str, torch.Tensor] = {}
    for name, target in new_sd.items():
        src = old_sd.get(name)
        if src is None:
            status[name] = "new"
        elif src.shape == target.shape:
            loaded[name], status[name] = src, "copied"
        elif _is_pos_embed_pair(name, src, target, old_spec, new_spec):
            loaded[name] = resize_pos_embed(src, old_spec["pos_embeds"][name],
                                            new_spec["pos_embeds"][name])
            status[name] = "interpolated"
        else:
            wide = widen_tensor(src, target.shape, new_spec["tensors"].get(name), maps,
                                noise_std, gen)
            status[name] = "new" if wide is None else "widened"
            if wide is not None:
                loaded[name] = wide
    status.update({name: "dropped" for name in old_sd if name not in new_sd})
    new_model.load_state_dict({**new_sd, **loaded})
    zero = getattr(new_model, "zero_init_new_branches", None)
    new_names = [n for n, s in status.items() if s == "new"]
    zeroed = zero(new_names) if callable(zero) else []
    diff, scale = probe_output_diff(old_model, new_model, probe_shape, seed)
    counts = Counter(status.values())
    report: dict[str, Any] = {"tensors": status,
              "counts": {k: counts.get(k, 0)
                         for k in ("copied", "widened", "interpolated", "new", "dropped")},
              "zeroed": zeroed, "max_output_diff": diff, "output_scale": scale,
              "relative_output_diff": diff / scale if scale > 0 else 0.0,
              "probe_shape": [int(s) for s in probe_shape], "noise_std": float(noise_std),
              "seed": int(seed)}
    logger.info("hand-off: %s; max output diff %.3g (output scale %.3g)",
                ", ".join(f"{v} {k}" for k, v in report["counts"].items()), diff, scale)
    return report


def _is_pos_embed_pair(name: str, src: torch.Tensor, target: torch.Tensor,
                       old_spec: dict[str, Any], new_spec: dict[str, Any]) -> bool:
    return (name in old_spec["pos_embeds"] and name in new_spec["pos_embeds"]
            and src.dim() == 3 and src.shape[-1] == target.shape[-1])


@torch.no_grad()
def probe_output_diff(old_model: nn.Module, new_model: nn.Module, probe_shape: tuple[int, ...],
                      seed: int = 0) -> tuple[float, float]:
    """Max |new(x) - old(x)| and max |old(x)| on a seeded normal probe x, both in eval mode.

    Raises:
        ValueError: the probe shape is not a valid input of either model.
    """
    x = torch.randn(tuple(probe_shape), generator=torch.Generator().manual_seed(seed))
    outs = []
    for model in (old_model, new_model):
        was_training = model.training
        model.eval()
        try:
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            y = model(x.to(dev))
        finally:
            model.train(was_training)
        outs.append((y[0] if isinstance(y, (list, tuple)) else y).detach().float().cpu())
    old_out, new_out = outs
    return float((new_out - old_out).abs().max()), float(old_out.abs().max())


def checked_transfer(ckpt: dict[str, Any], src: Any, where: str, new_model: nn.Module, arch: str,
                     probe_shape: tuple[int, ...], noise_std: float, seed: int) -> dict[str, Any]:
    """`transfer_weights` from a loaded checkpoint, refusing what cannot be handed off.

    Args:
        ckpt, src: the loaded source checkpoint and its file.
        where: what asked for it, for the message ("init_from stage1; stage stage2").
        arch: `new_model`'s arch (registry key).

    Raises:
        CheckpointError: the checkpoint is of another model family than `new_model`, or
            its tensors cannot be mapped onto it.
    """
    if ckpt["arch"] != arch:
        raise CheckpointError(f"{src}: a {ckpt['arch']} checkpoint ({where} trains {arch}) - "
                              "a hand-off needs a checkpoint of the same model family")
    old = model_from_checkpoint(ckpt, src)
    try:
        return transfer_weights(old, new_model, probe_shape=probe_shape, noise_std=noise_std, seed=seed)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{src}: cannot hand off ({where}): {first}; expected a smaller "
                              "member of the same model family") from None
