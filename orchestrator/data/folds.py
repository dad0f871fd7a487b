"""Subject-level K-fold cross-validation: which subjects validate each fold.

Every session of a subject lands in the same fold, so no subject is both trained and
validated on. The folds depend only on the set of subjects, K and the seed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from orchestrator.data.atlas import SubjectRecord
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


def split_records(records: Sequence[SubjectRecord], val_subjects: Sequence[str] | None,
                  val_fraction: float, seed: int) -> tuple[list[SubjectRecord], list[SubjectRecord]]:
    """(train, val): a fold's subjects validate when given, else the seeded `val_fraction` split.

    Raises:
        DataError: a fold names subjects the data tree does not have, or leaves no training subject.
    """
    if val_subjects is None:
        from orchestrator.data.dataset import split_subjects

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
