"""kill -9 `data cache` at seeded random moments, inside its HDF5 and manifest writes too:
the cache never offers a half-written file, and a rerun completes it exactly."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import reliability_kit as kit

from orchestrator.data.cache import MANIFEST_NAME, build_cache
from orchestrator.data.cachefile import load, load_sdm
from orchestrator.data.sources import discover_subjects
from orchestrator.errors import DataError

WRITES = {"*.h5": 6, MANIFEST_NAME: 1}

one_thread = kit.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.data.synth import synthesize_atlas

    root = tmp_path_factory.mktemp("src")
    synthesize_atlas(root, subjects=6, shape_vox=(40, 40, 40), seed=3)
    return root


def _contents(cache: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """What training reads from the cache, per subject; DataError if it refuses the folder."""
    out = {}
    for rec in discover_subjects(cache):
        vol = load(rec)
        out[rec.subject] = (vol.image, vol.label, vol.affine, load_sdm(rec.cached))
    return out


def test_cache_survives_kills(tmp_path: Path, source: Path) -> None:
    """After each kill the cache folder is either refused as a whole (no manifest, an
    incomplete one, or a listed file missing) or every file it lists reads completely and
    as built; the final rerun equals a build that was never interrupted and leaves no
    temporary file. A run that completes loses two files, so the next one rebuilds them
    under a complete manifest that still lists them."""
    want = _contents(build_cache(source, tmp_path / "reference").out)
    kit.run_child(kit.noop, ())
    t0 = time.monotonic()
    assert kit.run_cache_child(source, tmp_path / "timing") == 0
    build_s = time.monotonic() - t0
    rng = random.Random(kit.SEED + 1)
    out = tmp_path / "cache"
    kills = children = 0
    while kills < max(4, kit.KILLS // 4):
        spec = kit.next_kill(rng, children, build_s, WRITES)
        children += 1
        assert children <= kit.KILLS, f"only {kills} of {children} children were killed"
        timed = not isinstance(spec, kit.KillPoint)
        code = kit.run_cache_child(source, out, None if timed else spec, spec if timed else None)
        if code == 0:  # complete: lose two files, so that the next run rebuilds them under
            assert _contents(out).keys() == want.keys()  # a complete manifest listing them
            for h5 in sorted(out.glob("*.h5"))[:2]:
                h5.unlink()
            continue
        assert code == -9, f"after {spec}: the child exited {code}"
        kills += 1
        kit.TALLY["kills"] += 1
        try:
            got = _contents(out)
        except DataError as err:  # refused as a whole: say why, name the folder
            assert str(out) in str(err), err
            continue
        for subject, arrays in got.items():  # trusted: each file complete and as built
            for a, b in zip(arrays, want[subject]):
                np.testing.assert_array_equal(a, b)
    assert kit.run_cache_child(source, out) == 0
    got = _contents(out)
    assert got.keys() == want.keys()
    for subject, arrays in got.items():
        for a, b in zip(arrays, want[subject]):
            np.testing.assert_array_equal(a, b)
    assert not list(out.glob(".tmp-*")), "temporary files of killed writes were left"
