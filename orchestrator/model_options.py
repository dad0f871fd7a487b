"""A stage's `model:` block: one typed options model per architecture of models/.

`ModelOptions` is a union discriminated on `arch` (the key of `models.MODEL_REGISTRY`):
`arch: resunet3d` validates the rest of the block as `ResUNetOptions`, `arch: lcnn` as
`LCNNOptions`. Unknown keys are rejected (`extra="forbid"`) with the file, the key and a
close match. Every default of a model option is written here, once, for the config layer;
the constructors in models/ keep the same defaults so a model still builds in a notebook
without orchestrator/ (tests/test_model_options.py checks the two agree). A block is
written back (plan.yaml) with only the keys it was given.

The planner decides `base_filters`, `checkpointing` and, for the 3D family,
`input_size_vox`, so they are not model options: set them at the stage's top level.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

# constructor arguments the plan sets (StagePlan.model_kwargs), not the `model:` block
PLAN_SET_KEYS = ("base_filters", "checkpointing", "input_size_vox")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # keys offered as a close match for an unknown key (config_io.unknown_key)
    hint_keys: ClassVar[tuple[str, ...]] = PLAN_SET_KEYS

    @model_validator(mode="before")
    @classmethod
    def _not_plan_set(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in PLAN_SET_KEYS:
                if key in data:
                    raise ValueError(f"{key} is chosen by the plan; expected it at the stage's "
                                     f"top level ({key}: ...), not under model:")
        return data

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the keys the file set, as before the block was typed: plan.yaml keeps its shape and
        # planning/calibration.py's stage fingerprints (a hash of the dump) stay the same
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set or k == "arch"}

    def constructor_kwargs(self) -> dict[str, Any]:
        """Every option, defaults included, as the model constructor takes them (no arch)."""
        return {name: getattr(self, name) for name in type(self).model_fields if name != "arch"}

    @property
    def input_channels(self) -> int:
        """Channels of the network's input (image channels or stacked slices)."""
        raise NotImplementedError

    @property
    def classes(self) -> int:
        """Output classes (channels of the logits)."""
        raise NotImplementedError


class ResUNetOptions(_Options):
    """`arch: resunet3d`: the 3D residual U-Net family of the curriculum (models/unet3d.py)."""

    arch: Literal["resunet3d"] = Field(description="The model: the 3D family.")
    in_channels: int = Field(1, gt=0, description="Image channels of the input.")
    out_channels: int = Field(2, gt=0, description="Classes of the output (background included).")
    levels: int = Field(4, gt=0, description="Resolution levels (input sides are multiples of 2**levels).")
    blocks_per_level: int = Field(1, ge=0, description="Residual blocks per encoder level.")
    decoder_blocks_per_level: int = Field(1, ge=0, description="Residual blocks per decoder level.")
    hidden_ratio: float = Field(0.5, gt=0, description="Bottleneck width of a block, times its channels.")
    cardinality: int = Field(1, gt=0, description="Groups of the blocks' 3x3x3 convolution (ResNeXt).")
    se: bool = Field(False, description="Squeeze-and-excitation in every block.")
    se_reduction: int = Field(4, gt=0, description="Channel reduction of the SE blocks.")
    attention_gates: bool = Field(False, description="Attention gates on the skip connections.")
    transformer_depth: int = Field(0, ge=0, description="Transformer layers at the bottleneck (0: none).")
    transformer_dim: int = Field(256, gt=0, description="Width of the bottleneck transformer.")
    transformer_heads: int = Field(8, gt=0, description="Attention heads of the transformer.")
    max_filters: int | None = Field(None, gt=0, description="Cap on any level's channels; None: none.")
    deep_supervision: bool = Field(False, description="Auxiliary outputs at coarser decoder levels.")
    deep_supervision_heads: int = Field(2, gt=0, description=(
        "With deep_supervision: auxiliary heads (1 .. levels - 1)."))

    @model_validator(mode="after")
    def _check_heads(self) -> ResUNetOptions:
        if self.deep_supervision and not self.deep_supervision_heads <= self.levels - 1:
            raise ValueError(f"deep_supervision_heads must be in 1..{self.levels - 1} for "
                             f"{self.levels} levels, got {self.deep_supervision_heads}")
        return self

    @property
    def input_channels(self) -> int:
        return self.in_channels

    @property
    def classes(self) -> int:
        return self.out_channels


class LCNNOptions(_Options):
    """`arch: lcnn`: the 2D LCNN on stacks of adjacent axial slices (models/lcnn.py)."""

    arch: Literal["lcnn"] = Field(description="The model: LCNN (SEAN local path + global path).")
    in_slices: int = Field(5, ge=1, description="Slices per stack, 2T+1 (odd); the centre one is segmented.")
    num_classes: int = Field(2, ge=1, description="Classes of the output (background included).")
    global_weight: float = Field(0.3, ge=0, description="Weight of the global path's logits in the fusion.")
    local_weight: float = Field(0.7, ge=0, description="Weight of the local (SEAN) path's logits.")

    @model_validator(mode="after")
    def _check(self) -> LCNNOptions:
        if self.in_slices % 2 == 0:
            raise ValueError(f"in_slices must be odd (2T+1), got {self.in_slices}")
        if self.global_weight + self.local_weight <= 0:
            raise ValueError("global_weight and local_weight must not both be 0")
        return self

    @property
    def input_channels(self) -> int:
        return self.in_slices

    @property
    def classes(self) -> int:
        return self.num_classes


OPTION_MODELS: tuple[type[_Options], ...] = (ResUNetOptions, LCNNOptions)

ModelOptions = Annotated[ResUNetOptions | LCNNOptions, Field(discriminator="arch")]
