"""`bench curriculum`'s document beyond the arms' records: the arms at equal training time,
the headline figures, and the summary lines the command prints."""
from __future__ import annotations

from typing import Any

from orchestrator.config import StageSpec

ARMS = ("progressive", "scratch", "scratch_growing_patch")
TIME = "@equal_time"  # the scratch arms trained for the chain's seconds: "scratch@equal_time"


def equal_time_record(runs: dict[str, dict[str, Any]], budget_s: float, secs: dict,
                specs: list[StageSpec]) -> dict[str, Any]:
    """The arms at equal training time: the chain's time curve and both scratch arms
    trained for its seconds; "chain_lead": the chain's Dice minus the better scratch arm's
    at each fraction."""
    prog = runs["progressive"]
    arms = {"progressive": {"curve": prog.pop("curve_time"), "phases": prog["phases"]}}
    for name in ARMS[1:]:
        rec = runs[name + TIME]
        arms[name] = {**rec, "curve": rec.pop("curve_time")}
    for arm in arms.values():
        arm["test_dice"] = arm["curve"][-1]["test_dice"]
    curves = [[p["test_dice"] for p in arm["curve"]] for arm in arms.values()]
    lead = [round(c[0] - max(c[1:]), 4) for c in zip(*curves)]
    return {"budget_unit": "CPU seconds of training steps, one thread (each step priced by "
                           "timing it before the arms)",
            "budget_s": round(budget_s, 1),
            "step_seconds": {f"{specs[i].name} {p[0]}^3": round(t, 3) for (i, p), t in secs.items()},
            "arms": arms, "chain_lead": lead}


def figures(arms: dict, equal_time: dict, inference: dict) -> dict[str, float]:
    """The document's headline numbers ({name: number}, as every bench's)."""
    out = {f"{name}_test_dice": arm["test_dice"] for name, arm in arms.items()}
    out |= {f"{name}_test_dice_equal_time": arm["test_dice"]
            for name, arm in equal_time["arms"].items()}
    out["chain_lead_equal_time"] = equal_time["chain_lead"][-1]
    for step in ("single_pass", "mirrored", "mirrored_postprocessed"):
        out |= {f"chain_{step}_{k}": v for k, v in inference[step].items()}
    return out


def first_reach(curve: list[dict[str, Any]], target: float, at: str) -> float | None:
    """The curve's `at` (budget fraction, training CPU seconds) where it first reached
    `target` (None: never)."""
    return next((p[at] for p in curve if p["test_dice"] >= target), None)


def summary_lines(doc: dict) -> list[str]:
    """One line per arm at equal FLOPs (held-out Dice, budget, where it reached the others),
    the arms at equal training time, and the chain's model with mirroring and
    post-processing."""
    lines = [f"{doc['data']['anatomy']} data, {doc['data']['train_subjects']} training / "
             f"{doc['data']['test_subjects']} test subjects; budget {doc['budget_gflop']} GFLOP"]
    for name, arm in doc["arms"].items():
        cpu = arm["reached_others_final_at_train_cpu_s"]
        reach = ", ".join(f"{o} at {'-' if f is None else f'{f:.2f} of the budget ({cpu[o]} CPU s)'}"
                          for o, f in arm["reached_others_final_at"].items())
        lines.append(f"{name}: test Dice {arm['test_dice']:.3f} ({arm['budget_gflop']} GFLOP, "
                     f"{arm['train_cpu_s']} CPU s training, {arm['cpu_s']} with tests); "
                     f"reached {reach}")
    eq = doc["equal_time"]
    fractions = "/".join(f"{round(100 * f)}" for f in doc["eval_fractions"])
    lines.append(f"equal training time ({eq['budget_s']} s planned, one thread), held-out Dice "
                 f"at {fractions} %:")
    for name, arm in eq["arms"].items():
        dice = " / ".join(f"{p['test_dice']:.3f}" for p in arm["curve"])
        cpu = " / ".join(f"{p['train_cpu_s']}" for p in arm["curve"])
        lines.append(f"  {name}: {dice} (measured training CPU s {cpu})")
    lines.append(f"  the chain's lead over the better scratch arm: "
                 f"{' / '.join(f'{x:+.3f}' for x in eq['chain_lead'])}")
    inf = doc["chain_inference"]
    steps = ", ".join(f"{k.replace('_', ' ')} Dice {inf[k]['dice']:.3f} lesion F1 "
                      f"{inf[k]['lesion_f1']:.3f}"
                      for k in ("single_pass", "mirrored", "mirrored_postprocessed"))
    secs = inf["seconds_per_volume"]
    lines.append(f"the chain's model on the test subjects: {steps}; post-processing "
                 f"{inf['postprocessing']['choice']}; {secs['single_pass']} s/volume, "
                 f"{secs['mirrored']} mirrored")
    return lines
