"""Measured/predicted peak-memory ratios from `plan --verify`, per hardware and stage.

`plan --verify` measures each planned stage on this machine and records
measured_gb / predicted_gb (the prediction before any calibration) under a hardware key
(device type, CPU or GPU model, torch version), the stage's name and whether the
measured configuration used gradient checkpointing (`entry_name`: the gap between the
process and its tensors differs between the two; measured on the CPU here: 1.16 without,
0.97 with, for stage 2). A later plan on the same hardware multiplies the predictions of
that stage's configurations of the same kind by the ratio, and says so, if the stage's
spec is the one measured (a fingerprint of the resolved stage YAML: a stage changed
since, or the same name in another curriculum, is not calibrated).

An entry keeps the ratios of its last `HISTORY` runs and a plan applies the highest: a
process's peak on the CPU moves by a few percent between runs of the same configuration
(measured: 1.076 and 1.138 for stage 3 at 4 GB, docs/benchmarks.md), and a prediction
too low is an out-of-memory error where one too high costs a few percent of the budget.

The file is JSON at $ORCHESTRATOR_CALIBRATION, else $XDG_CACHE_HOME/orchestrator/
calibration.json (~/.cache/...); ORCHESTRATOR_CALIBRATION=off disables it. Written
atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.atomic import atomic_write_text
from orchestrator.config import ProbeRecord, StageSpec
from orchestrator.errors import ConfigError

ENV_VAR = "ORCHESTRATOR_CALIBRATION"
VERSION = 1
HISTORY = 5  # ratios kept per entry; the highest is applied


def calibration_path() -> Path | None:
    """Where the calibration file lives, or None when disabled."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        if value.strip().lower() in ("", "off", "none", "0"):
            return None
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "orchestrator" / "calibration.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_key(device: str, probe: ProbeRecord) -> str | None:
    """`device|model|torch version`; None for a GPU plan on a machine without the GPU."""
    if device == "cuda":
        if not probe.gpus:
            return None
        model = probe.gpus[0].name
    else:
        model = cpu_model()
    return f"{device}|{model}|torch {torch.__version__}"


def entry_name(stage: str, checkpointing: bool) -> str:
    """The calibration entry of a stage's configurations with or without checkpointing."""
    return f"{stage}+checkpointing" if checkpointing else stage


def stage_fingerprint(spec: StageSpec) -> str:
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": VERSION, "hardware": {}}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable calibration file ({err}); expected JSON written "
                          f"by `plan --verify`; delete it or set {ENV_VAR}=off") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION \
            or not isinstance(doc.get("hardware"), dict):
        raise ConfigError(f"{path}: version/hardware: expected a version {VERSION} calibration "
                          f"file written by `plan --verify`; delete it or set {ENV_VAR}=off")
    return doc


def _ratios(entry: dict[str, Any]) -> list[float]:
    """The entry's measured ratios, oldest first (an entry written before the history was
    kept holds one, as `ratio`); positive numbers only."""
    kept = entry.get("ratios")
    values = kept if isinstance(kept, list) else [entry.get("ratio")]
    return [float(r) for r in values if isinstance(r, (int, float)) and r > 0]


def load_ratios(path: Path | None, key: str | None,
                specs: list[StageSpec]) -> dict[str, tuple[float, str]]:
    """{entry name: (ratio, where from)} for the stages measured on this hardware as they
    are, an entry for each of checkpointing off and on that was measured (`entry_name`);
    the ratio is the highest of the entry's last runs.

    Raises:
        ConfigError: the file exists but is not a calibration file.
    """
    if path is None or key is None:
        return {}
    entries = _read(path)["hardware"].get(key, {})
    out = {}
    for spec in specs:
        for name in (entry_name(spec.name, False), entry_name(spec.name, True)):
            e = entries.get(name)
            if not isinstance(e, dict) or e.get("fingerprint") != stage_fingerprint(spec):
                continue
            ratios = _ratios(e)
            if not ratios:
                continue
            runs = f": the highest of its last {len(ratios)} runs, the latest" if len(ratios) > 1 else ""
            out[name] = (max(ratios), f"`plan --verify`{runs} on {e.get('date', '?')} ({path})")
    return out


def record_ratios(path: Path, key: str, measured: dict[str, dict[str, Any]],
                  specs: dict[str, StageSpec], fingerprints: dict[str, str] | None = None) -> None:
    """Store {entry name: {"stage", "ratio", ...}} under `key`, replacing those entries;
    each keeps the ratios of its last `HISTORY` runs (`ratios`) while its stage is unchanged.

    `fingerprints` are those of the stage YAMLs as planned from (the plan's own specs may
    carry epochs the dataset set); missing ones are taken from `specs`.

    Raises:
        ConfigError: the file exists but is not a calibration file.
    """
    doc = _read(path)
    entries = doc["hardware"].setdefault(key, {})
    date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for name, m in measured.items():
        stage = m.get("stage", name)
        fp = (fingerprints or {}).get(stage) or stage_fingerprint(specs[stage])
        before = entries.get(name)
        kept = _ratios(before) if isinstance(before, dict) and before.get("fingerprint") == fp else []
        entries[name] = {**m, "fingerprint": fp, "date": date,
                         "ratios": [*kept, float(m["ratio"])][-HISTORY:]}
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
