"""Subject-level K-fold cross-validation: which subjects validate each fold.

Every session of a subject lands in the same fold, so no subject is both trained and
validated on. The folds depend only on the set of subjects, K and the seed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from orchestrator.data.records import SubjectRecord
from orchestrator.errors import ConfigError, DataError


def make_folds(subjects: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    """Split the subjects into `k` folds of near-equal size (a seeded shuffle, dealt round-robin).

    Returns:
        k sorted lists of subject ids: fold i is the validation set of fold i's training.

    Raises:
        ConfigError: k < 2, or more folds than subjects.
    """
    unique = sorted(set(subjects))
    if k < 2:
        raise ConfigError(f"--folds {k}: expected at least 2 folds")
    if k > len(unique):
        raise ConfigError(f"--folds {k}: only {len(unique)} subjects; expected at most "
                          f"{len(unique)} folds")
    order = np.random.default_rng([seed, k]).permutation(len(unique))
    return [sorted(unique[j] for j in order[i::k]) for i in range(k)]


def split_subjects(
    records: Sequence[SubjectRecord], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[SubjectRecord], list[SubjectRecord]]:
    """Split records into training and validation sets by subject.

    All sessions of one subject land on the same side. The split depends only on the set
    of records and the seed (not on their order). With two or more subjects each side
    gets at least one; a single subject goes to training.

    Args:
        records: the subjects (from `discover_subjects`).
        val_fraction: share of subjects for validation, in [0, 1).
        seed: seed of the shuffle.

    Returns:
        (train, val), each sorted.

    Raises:
        ConfigError: `val_fraction` outside [0, 1).
        DataError: `records` is empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction {val_fraction}; expected a value in [0, 1)")
    if not records:
        raise DataError("split_subjects: no subjects to split; expected at least one record")
    subjects = sorted({rec.subject for rec in records})
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = int(round(val_fraction * len(subjects)))
    n_val = min(max(n_val, 1), len(subjects) - 1) if len(subjects) >= 2 else 0
    val_subjects = {subjects[j] for j in order[:n_val]}
    train = sorted(rec for rec in records if rec.subject not in val_subjects)
    val = sorted(rec for rec in records if rec.subject in val_subjects)
    return train, val


def split_records(records: Sequence[SubjectRecord], val_subjects: Sequence[str] | None,
                  val_fraction: float, seed: int) -> tuple[list[SubjectRecord], list[SubjectRecord]]:
    """(train, val): a fold's subjects validate when given, else the seeded `val_fraction` split.

    Raises:
        DataError: a fold names subjects the data tree does not have, or leaves no training subject.
    """
    if val_subjects is None:
        return split_subjects(records, val_fraction, seed)
    wanted = set(val_subjects)
    missing = wanted - {r.subject for r in records}
    if missing:
        raise DataError(f"fold validation subjects {sorted(missing)[:3]} are not in the data; "
                        "expected the subjects the folds were made from (folds.json)")
    train = sorted(r for r in records if r.subject not in wanted)
    if not train:
        raise DataError("the fold leaves no training subject; expected fewer folds")
    return train, sorted(r for r in records if r.subject in wanted)


def folds_document(folds: list[list[str]], seed: int) -> dict[str, Any]:
    """What runs/<run>/folds.json holds."""
    return {"k": len(folds), "seed": seed,
            "folds": [{"fold": i, "val_subjects": f} for i, f in enumerate(folds)]}
