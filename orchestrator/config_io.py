"""Reading YAML and turning pydantic's errors into one line per problem.

The loaders of config.py and cluster_config.py are the only code that sees raw dicts;
they go through `read_yaml` and `parse_model`, so every bad file reads the same way:
``stages/s1.yaml: unknown key 'lr_rate' (did you mean 'lr'?)``.
"""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


class StrictModel(BaseModel):
    """The base of the config models: unknown keys rejected, instances frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def unknown_key(source: Path | str, shown: str, key: str, valid: list[str]) -> str:
    """`file: unknown key 'x' (did you mean 'y'?)`, or the valid keys when none is close."""
    # a shared prefix ('lr_rate' -> 'lr') beats string similarity ('lr_rate' -> 'val_fraction')
    prefixed = sorted((v for v in valid if key.startswith(v) or v.startswith(key)), key=len)
    hint = prefixed[-1:] or difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    extra = f" (did you mean {hint[0]!r}?)" if hint else f" (valid: {', '.join(sorted(valid))})"
    return f"{source}: unknown key {shown!r}{extra}"


def _tagged(annotation: Any) -> dict[str, type[BaseModel]]:
    """{tag: model} of a union discriminated on a Literal field ({} for anything else)."""
    members = [a for a in typing.get_args(annotation)
               if isinstance(a, type) and issubclass(a, BaseModel)]
    out: dict[str, type[BaseModel]] = {}
    for member in members:
        for field in member.model_fields.values():
            if typing.get_origin(field.annotation) is typing.Literal:
                out.update({str(tag): member for tag in typing.get_args(field.annotation)})
    return out


def _inner_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds, and whether a list index or dict key comes before it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    models = [a for a in typing.get_args(annotation)
              if isinstance(a, type) and issubclass(a, BaseModel)]
    keyed = typing.get_origin(annotation) in (list, tuple, dict)
    return (models[0], keyed) if len(models) == 1 else (None, False)


def _walk(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None,
                                                              dict[str, type[BaseModel]]]:
    """The location as the user wrote it (a union's tag left out), the model that holds its
    last key (None when it cannot be told) and the tags of the union it names ({})."""
    shown: list[str] = []
    holder: type[BaseModel] | None = cls
    current: type[BaseModel] | None = cls
    union: dict[str, type[BaseModel]] = {}
    keyed = False
    for part in loc:
        if union and str(part) in union:
            current, union = union[str(part)], {}
            continue
        shown.append(str(part))
        holder = current
        if keyed:
            keyed = False
            continue
        field = current.model_fields.get(str(part)) if current is not None else None
        if field is None:
            current, union = None, {}
            continue
        union = _tagged(field.annotation)
        current, keyed = _inner_model(field.annotation)
    return shown, holder, union


def _format_error(path: Path | str, err: ValidationError, cls: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        shown, holder, union = _walk(cls, tuple(e["loc"]))
        loc = ".".join(shown)
        ctx = e.get("ctx") or {}
        if e["type"] == "extra_forbidden":
            valid = list(holder.model_fields) if holder is not None else []
            valid += list(getattr(holder, "hint_keys", ()))
            lines.append(unknown_key(path, loc, shown[-1], sorted(set(valid))))
        elif e["type"] == "union_tag_invalid":
            key = str(ctx["discriminator"]).strip("'")
            lines.append(f"{path}: {loc}.{key}: unknown {loc} {key} {ctx['tag']!r} "
                         f"(valid: {ctx['expected_tags']})")
        elif e["type"] == "union_tag_not_found":
            key = str(ctx["discriminator"]).strip("'")
            lines.append(f"{path}: {loc}: needs an {key!r} key, one of {', '.join(sorted(union))}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path}: {loc or 'file'}: {e['msg']}{got_s}")
    return "; ".join(lines)


def parse_model(cls: type[BaseModel], data: Any, source: Path | str) -> Any:
    """Validate `data` as `cls`; a failure becomes one ConfigError line naming `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, cls)) from None


def read_yaml(path: Path) -> Any:
    """Read a YAML file; a missing or malformed file is a ConfigError naming it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
