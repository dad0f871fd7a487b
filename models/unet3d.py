"""ResUNet3D: the 3D family, from a residual U-Net to an SE-ResNeXt/transformer hybrid.

One class, four configurations (`STAGE_PRESETS`). Parameter names do not depend on the
feature switches, so a bigger configuration contains every tensor of a smaller one under
the same name (possibly wider); what a stage adds (SE, attention gates, transformer
blocks, extra blocks, deep-supervision heads) are extra modules whose last layer can be
zeroed to make them the identity. Skips are additive (one channel space per level), which
keeps Net2Net widening a per-level affair.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.blocks import AttentionGate, Down, Head, ResidualBlock, Up, conv
from models.transformer import BottleneckTransformer

logger = logging.getLogger(__name__)


class ResUNet3D(nn.Module):
    """Residual 3D U-Net with optional SE, attention gates, ResNeXt blocks and transformer.

    Level i (0..levels) has `base_filters * 2**i` channels (capped at `max_filters`);
    inputs must be multiples of `2**levels` on every side (`required_multiple`).

    Args:
        in_channels: image channels.
        out_channels: classes (logit channels).
        base_filters: channels at full resolution.
        levels: number of downsamplings.
        blocks_per_level: residual blocks per encoder level.
        decoder_blocks_per_level: residual blocks per decoder level.
        hidden_ratio: bottleneck width of a block / its channels (rounded to a multiple
            of cardinality).
        cardinality: groups of each block's 3x3x3 conv (ResNeXt when > 1).
        se: squeeze-and-excitation in every block.
        se_reduction: SE hidden width divisor.
        attention_gates: additive attention gates on the skips.
        transformer_depth: transformer blocks at the bottleneck (0: none).
        transformer_dim: token width.
        transformer_heads: attention heads.
        input_size_vox: input size the model is built for; sets the stored grid of the
            position embedding (other sizes interpolate it on the fly).
        max_filters: cap on the channels of a level (None: no cap).
        deep_supervision: in training mode, also return logits of coarser decoder levels.
        deep_supervision_heads: how many coarser levels get a head (1..levels-1).
        checkpointing: gradient checkpointing of every block (less memory, more compute).

    Raises:
        ValueError: a count or size out of range, or input_size_vox not a multiple of
            `2**levels`.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, *, base_filters: int = 16,
                 levels: int = 4, blocks_per_level: int = 1, decoder_blocks_per_level: int = 1,
                 hidden_ratio: float = 0.5, cardinality: int = 1, se: bool = False,
                 se_reduction: int = 4, attention_gates: bool = False,
                 transformer_depth: int = 0, transformer_dim: int = 256,
                 transformer_heads: int = 8,
                 input_size_vox: Sequence[int] = (128, 128, 128),
                 max_filters: int | None = None, deep_supervision: bool = False,
                 deep_supervision_heads: int = 2, checkpointing: bool = False) -> None:
        super().__init__()
        _check_ranges(in_channels=in_channels, out_channels=out_channels,
                      base_filters=base_filters, levels=levels, cardinality=cardinality,
                      se_reduction=se_reduction, transformer_heads=transformer_heads,
                      transformer_dim=transformer_dim)
        _check_ranges(blocks_per_level=blocks_per_level, transformer_depth=transformer_depth,
                      decoder_blocks_per_level=decoder_blocks_per_level, minimum=0)
        if max_filters is not None:
            _check_ranges(max_filters=max_filters)
        if hidden_ratio <= 0:
            raise ValueError(f"hidden_ratio must be > 0, got {hidden_ratio}")
        if deep_supervision and not 1 <= deep_supervision_heads <= levels - 1:
            raise ValueError(f"deep_supervision_heads must be in 1..{levels - 1} for "
                             f"{levels} levels, got {deep_supervision_heads}")
        self.in_channels, self.out_channels, self.levels = in_channels, out_channels, levels
        self.input_size_vox = tuple(int(s) for s in input_size_vox)
        if len(self.input_size_vox) != 3 or any(s <= 0 or s % self.required_multiple
                                                 for s in self.input_size_vox):
            raise ValueError(f"input_size_vox {self.input_size_vox} must be 3 positive "
                             f"multiples of {self.required_multiple}")
        self.deep_supervision, self.checkpointing = deep_supervision, checkpointing
        width = [base_filters * 2**i for i in range(levels + 1)]
        if max_filters is not None:
            width = [min(w, max_filters) for w in width]
        self.widths = width

        def block(i: int) -> ResidualBlock:
            hidden = max(1, round(width[i] * hidden_ratio / cardinality)) * cardinality
            return ResidualBlock(width[i], f"L{i}", hidden, cardinality, se, se_reduction)

        self.stem = conv(in_channels, width[0], 3, None, "L0")
        self.encoder = nn.ModuleList()
        for i in range(levels + 1):
            level = nn.ModuleDict()
            if i > 0:
                level["down"] = Down(width[i - 1], width[i], f"L{i - 1}", f"L{i}")
            level["blocks"] = nn.ModuleList(block(i) for _ in range(blocks_per_level))
            self.encoder.append(level)
        self.transformer = None
        if transformer_depth:
            grid = tuple(s // self.required_multiple for s in self.input_size_vox)
            self.transformer = BottleneckTransformer(width[levels], f"L{levels}", transformer_dim,
                                                     transformer_depth, transformer_heads, grid)
        self.decoder = nn.ModuleList()  # decoder[i] produces level i (run from levels-1 to 0)
        for i in range(levels):
            level = nn.ModuleDict({"up": Up(width[i + 1], width[i], f"L{i + 1}", f"L{i}")})
            if attention_gates:
                level["gate"] = AttentionGate(width[i], f"L{i}", max(width[i] // 2, 1))
            level["blocks"] = nn.ModuleList(block(i) for _ in range(decoder_blocks_per_level))
            self.decoder.append(level)
        self.head = Head(width[0], out_channels, "L0")
        n_ds = deep_supervision_heads if deep_supervision else 0
        self.ds_heads = nn.ModuleList(Head(width[k], out_channels, f"L{k}", branch=True)
                                      for k in range(1, n_ds + 1))

    @property
    def required_multiple(self) -> int:
        """Every spatial side of the input must be a multiple of this."""
        return 2**self.levels

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters (stem, encoder levels, bottleneck transformer): what
        fine-tuning with a frozen encoder keeps fixed."""
        parts = [self.stem, self.encoder] + ([self.transformer] if self.transformer else [])
        for part in parts:
            yield from part.parameters()

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (batch, {self.in_channels}, x, y, z), "
                             f"got {tuple(x.shape)}")
        sides = tuple(int(s) for s in x.shape[2:])
        if any(s % self.required_multiple or s == 0 for s in sides):
            raise ValueError(f"input spatial size {sides} must be a multiple of "
                             f"{self.required_multiple} on every side")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits (B, out_channels, X, Y, Z); in training with deep supervision a list.

        Raises:
            ValueError: x is not 5D with in_channels channels, or a side is not a
                multiple of `required_multiple`.
        """
        self._check_input(x)
        h = self.stem(x)
        skips = []
        for i, level in enumerate(self.encoder):
            assert isinstance(level, nn.ModuleDict)  # built so in __init__; narrows the type
            if i > 0:
                h = level["down"](h)
            for blk in level["blocks"].children():  # the ModuleList's blocks, in order
                h = self._run(blk, h)
            skips.append(h)
        if self.transformer is not None:
            h = self.transformer(h, self._run)
        want_ds = self.deep_supervision and self.training
        feats: dict[int, torch.Tensor] = {}
        for i in reversed(range(self.levels)):
            level = self.decoder[i]
            assert isinstance(level, nn.ModuleDict)  # as above
            up = level["up"](h)
            skip = level["gate"](skips[i], up) if "gate" in level else skips[i]
            h = up + skip
            for blk in level["blocks"].children():  # the ModuleList's blocks, in order
                h = self._run(blk, h)
            feats[i] = h
        main = self.head(h)
        if not want_ds:
            return main
        return [main] + [head(feats[k + 1]) for k, head in enumerate(self.ds_heads)]

    def handoff_spec(self) -> dict[str, Any]:
        """What the hand-off needs to map this model onto a bigger member of the family.

        Returns:
            {"tensors": {name: per-dim (space, role) or None}, "space_groups": {space:
            groups}, "pos_embeds": {name: token grid}, "branch_last_layers": [module
            paths whose parameters are zeroed to make a new branch the identity]}.
        """
        tensors: dict[str, tuple] = {}
        groups: dict[str, int] = {}
        pos: dict[str, tuple[int, ...]] = {}
        branches: list[str] = []
        for path, mod in self.named_modules():
            parent = path.rpartition(".")[0]

            def resolve(space: str, parent: str = parent) -> str:
                return f"{parent}/{space[1:]}" if space.startswith("@") else space

            for pname, dims in getattr(mod, "handoff_dims", {}).items():
                tensors[f"{path}.{pname}"] = tuple(
                    None if d is None else (resolve(d[0]), d[1]) for d in dims)
            for space, g in getattr(mod, "handoff_groups", {}).items():
                groups[resolve(space)] = g
            if isinstance(mod, BottleneckTransformer):
                pos[f"{path}.pos_embed"] = mod.pos_embed_grid
            branches += [f"{path}.{last}" for last in getattr(mod, "handoff_last_layers", ())]
        return {"tensors": tensors, "space_groups": groups, "pos_embeds": pos,
                "branch_last_layers": branches}

    @torch.no_grad()
    def zero_init_new_branches(self, new_names: Iterable[str]) -> list[str]:
        """Zero the last layer of every branch whose last layer is entirely new.

        Args:
            new_names: state_dict names that did not come from the previous model.

        Returns:
            The parameter names that were zeroed.
        """
        new = set(new_names)
        zeroed: list[str] = []
        for layer in self.handoff_spec()["branch_last_layers"]:
            params = list(self.get_submodule(layer).named_parameters())
            names = [f"{layer}.{n}" for n, _ in params]
            if names and all(n in new for n in names):
                for _, p in params:
                    p.zero_()
                zeroed += names
        return zeroed


def _check_ranges(minimum: int = 1, **counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


_STAGE2_SWITCHES: dict[str, Any] = {"se": True, "attention_gates": True}
_HYBRID: dict[str, Any] = {**_STAGE2_SWITCHES, "cardinality": 8, "hidden_ratio": 1.5,
                           "transformer_dim": 256, "transformer_heads": 8}

STAGE_PRESETS: dict[str, dict[str, Any]] = {
    # ResNet bottleneck blocks (hidden = channels / 4), 4 downsamplings everywhere.
    "stage1_basic_cnn": {"base_filters": 8, "levels": 4, "blocks_per_level": 1,
                         "hidden_ratio": 0.25, "input_size_vox": (96, 96, 96)},
    # x2 wider, + SE in every block, + attention gates on the skips.
    "stage2_cnn_attention": {"base_filters": 16, "levels": 4, "blocks_per_level": 1,
                             "hidden_ratio": 0.25, **_STAGE2_SWITCHES,
                             "input_size_vox": (112, 112, 112)},
    # x1.5 wider, SE-ResNeXt blocks (8 groups, each as wide as a stage-2 bottleneck, so the
    # hand-off is exact), + 2 transformer blocks at the bottleneck.
    "stage3_hybrid_small": {"base_filters": 24, "levels": 4, "blocks_per_level": 1,
                            **_HYBRID, "transformer_depth": 2,
                            "input_size_vox": (128, 128, 128)},
    # x4/3 wider, 2 encoder blocks per level, 8 transformer blocks, deep supervision.
    "stage4_hybrid_full": {"base_filters": 32, "levels": 4, "blocks_per_level": 2,
                           **_HYBRID, "transformer_depth": 8, "deep_supervision": True,
                           "deep_supervision_heads": 2, "input_size_vox": (144, 144, 144)},
}
"""Constructor options of the four curriculum stages (targets 0.5M, 2M, 8M, 22M params)."""
