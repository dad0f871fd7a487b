"""The `model:` block of a stage YAML: one typed options model per architecture."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import models
from orchestrator.config import LCNNOptions, ResUNetOptions, load_stage, parse_model
from orchestrator.errors import ConfigError
from orchestrator.model_options import OPTION_MODELS, PLAN_SET_KEYS

SEED_ALIASES = {"num_channels", "T"}  # LCNN's notebook-only names for in_slices


def _stage(tmp_path: Path, model: str, extra: str = "") -> Path:
    side = "[64, 64]" if "lcnn" in model else "[32, 32, 32]"
    kind = "kind: lcnn\n" if "lcnn" in model else ""
    p = tmp_path / "s.yaml"
    p.write_text(f"name: s\n{kind}model: {model}\ninput_size_vox: {side}\n{extra}")
    return p


@pytest.mark.parametrize("options", OPTION_MODELS)
def test_options_match_the_constructor(options: type) -> None:
    """Every option is a constructor argument with the same default; what the options leave
    out is set by the plan (or is a seed alias)."""
    arch = options.model_fields["arch"].annotation.__args__[0]
    params = inspect.signature(models.model_class(arch).__init__).parameters
    fields = {n: f for n, f in options.model_fields.items() if n != "arch"}
    assert set(params) - {"self"} - set(fields) <= set(PLAN_SET_KEYS) | SEED_ALIASES
    for name, field in fields.items():
        default = params[name].default
        if arch == "lcnn" and name == "in_slices":
            default = 5  # LCNN(in_slices=None) takes 5 (or 2T+1 from the seed's T)
        assert field.default == default, f"{arch}.{name}"


def test_every_registered_arch_has_options() -> None:
    tags = {o.model_fields["arch"].annotation.__args__[0] for o in OPTION_MODELS}
    assert tags == set(models.MODEL_REGISTRY)


def test_options_are_typed_and_build_the_model(tmp_path: Path) -> None:
    spec = load_stage(_stage(tmp_path, "{arch: lcnn, in_slices: 3}"))
    assert isinstance(spec.model, LCNNOptions) and spec.model.input_channels == 3
    assert spec.model.classes == 2
    net = models.build_model("lcnn", base_filters=4, **spec.model.constructor_kwargs())
    assert net.in_slices == 3
    spec = load_stage(_stage(tmp_path, "{arch: resunet3d}"))
    assert isinstance(spec.model, ResUNetOptions) and spec.model.input_channels == 1


def test_written_back_with_the_keys_given(tmp_path: Path) -> None:
    """plan.yaml keeps the block as written (calibration fingerprints hash it)."""
    spec = load_stage(_stage(tmp_path, "{arch: resunet3d, se: true}"))
    assert spec.model_dump(mode="json")["model"] == {"arch": "resunet3d", "se": True}
    again = parse_model(type(spec), spec.model_dump(mode="json"), "plan.yaml")
    assert again == spec


@pytest.mark.parametrize(("model", "match"), [
    ("{arch: resunet3d, levles: 3}", r"s\.yaml: unknown key 'model\.levles' \(did you mean 'levels'\?\)"),
    ("{arch: lcnn, in_slice: 3}", r"s\.yaml: unknown key 'model\.in_slice' \(did you mean 'in_slices'\?\)"),
    ("{arch: resunet3d, base_filters: 8}",
     r"s\.yaml: model: .*base_filters is chosen by the plan; expected it at the stage's top level"),
    ("{arch: lcnn, in_slices: 4}", r"s\.yaml: model: .*in_slices must be odd"),
    ("{arch: resunet3d, levels: 0}", r"s\.yaml: model\.levels: Input should be greater than 0 \(got 0\)"),
    ("{arch: resunet3d, deep_supervision: true, deep_supervision_heads: 4}",
     r"s\.yaml: model: .*deep_supervision_heads must be in 1\.\.3"),
    ("{levels: 3}", r"s\.yaml: model: needs an 'arch' key, one of lcnn, resunet3d"),
    ("{arch: unet9000}",
     r"s\.yaml: model\.arch: unknown model arch 'unet9000' \(valid: 'resunet3d', 'lcnn'\)"),
])
def test_bad_options_are_one_line(tmp_path: Path, model: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        load_stage(_stage(tmp_path, model))
    assert "\n" not in str(err.value)
