"""The training knobs of a stage YAML: loss, augmentation, learning-rate schedule.

`TrainingKnobs` holds the fields a practitioner turns most (focal gamma/alpha,
deep-supervision weights, augmentation strength, the cosine schedule's floor and the
learning-rate warm-up after a hand-off); `StageSpec` (config.py) inherits them, so they
sit at the top level of a stage YAML, are validated like every other field and give the
same one-line errors.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_AUGMENT_STRENGTH = 2.0


class TrainingKnobs(BaseModel):
    """Loss, augmentation and schedule settings of a stage (flat keys of its YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    early_stop_patience_epochs: int | None = Field(None, gt=0, description=(
        "Stop the stage when its best validation Dice has not improved for this many "
        "validated epochs; None: train every epoch."))
    focal_gamma: float = Field(2.0, ge=0, description=(
        "3D: exponent of the focal term, (1 - p_t)^gamma x BCE (0: plain BCE)."))
    focal_alpha: float | None = Field(None, ge=0, le=1, description=(
        "3D: weight of a class's positive voxels in the focal term (1 - alpha its "
        "negatives'), as MONAI's FocalLoss; None: no weighting."))
    deep_supervision_weights: tuple[Annotated[float, Field(ge=0)], ...] | None = Field(
        None, description=(
            "3D with model.deep_supervision: the regional loss's weight on each output, the "
            "full-resolution one first, then each auxiliary head (deep_supervision_heads + 1 "
            "values); None: 1, 0.5, 0.25, ... (MONAI's exp mode)."))
    augment_strength: float = Field(1.0, ge=0, le=MAX_AUGMENT_STRENGTH, description=(
        "With augment: scales how often and how far patches are rotated, scaled, "
        "gamma-corrected and noised (1: the defaults of data/augment.py; 0: no "
        "augmentation at all)."))
    min_lr: float = Field(0.0, ge=0, description=(
        "The cosine schedule's floor: the learning rate it decays to at the last step "
        "(below lr)."))
    handoff_warmup_epochs: int = Field(0, ge=0, description=(
        "A stage that starts from a hand-off (init_from or init_checkpoint) ramps its "
        "learning rate from handoff_warmup_start x lr to lr over this many epochs, in "
        "place of warmup_epochs; 0: warmup_epochs applies."))
    handoff_warmup_steps: int = Field(0, ge=0, description=(
        "The same span in optimizer steps (set one of the two)."))
    handoff_warmup_start: float = Field(0.1, gt=0, le=1, description=(
        "Fraction of lr a hand-off warm-up starts from."))

    @model_validator(mode="after")
    def _check_knobs(self) -> Any:
        lr = getattr(self, "lr", None)
        if lr is not None and self.min_lr >= lr:
            raise ValueError(f"min_lr {self.min_lr} must be below lr {lr}")
        if self.handoff_warmup_epochs and self.handoff_warmup_steps:
            raise ValueError("handoff_warmup_epochs and handoff_warmup_steps both set; "
                             "expected one of them")
        weights = self.deep_supervision_weights
        if weights is not None:
            if not getattr(getattr(self, "model", None), "deep_supervision", False):
                raise ValueError("deep_supervision_weights needs model.deep_supervision: true")
            if not weights or weights[0] <= 0:
                raise ValueError("deep_supervision_weights: the first (full-resolution) weight "
                                 "must be above 0")
        return self

    def handoff_warmup_span(self, iterations_per_epoch: int) -> int:
        """Optimizer steps of the warm-up after a hand-off (0: none)."""
        return self.handoff_warmup_steps or self.handoff_warmup_epochs * iterations_per_epoch
