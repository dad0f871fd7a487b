"""The HDF5 cache layout: read a preprocessing-cache folder (written by `orchestrator.data.cache`).

Like every layout module it offers `find_records(cache_dir)` (the subjects its manifest,
`orchestrator-cache.json`, lists) and `load(rec)`, the whole subject as a `Volume` (what
`load_subject` returns for a cached record). `CachedVolume` reads patches without loading
the volume, through a small per-process pool of open files (h5py handles are never
pickled, and a forked DataLoader worker opens its own). Every problem is a one-line
`DataError` naming the file.

The volumes are stored contiguous and uncompressed (since issue 27), so a patch is read
through a read-only numpy memmap at the dataset's offset in the file (`get_offset`, as
h5py documents for this case): a copy out of the page cache, as fast as from an array in
RAM. A 144^3 crop took 1.1 ms that way against 6.5 ms through h5py's hyperslab read of the
same file and 10.9 ms from the 32^3 chunks the cache had before (docs/benchmarks.md,
"Cache crops"). A cache built with chunks (or any dataset without an offset) is read
through h5py, as before.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.records import CACHE_MANIFEST_NAME, SubjectRecord, Volume
from orchestrator.errors import DataError

MANIFEST_NAME = CACHE_MANIFEST_NAME
CACHE_FORMAT = "orchestrator-cache"
CACHE_VERSION = 1
DATASETS = ("image", "label", "sdm", "lesion_flat")
MAX_OPEN_FILES = 64  # per process, for patch reads
REBUILD_HINT = "rerun `orchestrator data cache` on the source folder"


def load(rec: SubjectRecord) -> Volume:
    """The whole cached subject as a `Volume` (what `load_subject` returns for it).

    Raises:
        DataError: the file is missing, not HDF5 or truncated, or lacks a dataset or
            attribute, or its label's shape differs from its image's.
    """
    assert rec.cached is not None
    with _open(rec.cached) as f:
        image = np.asarray(_read(f, rec.cached, "image"), dtype=np.float32)
        label = np.asarray(_read(f, rec.cached, "label"), dtype=np.uint8)
        affine = np.asarray(_attr(f, rec.cached, "affine"), dtype=np.float64)
        background = float(_attr(f, rec.cached, "background"))
    if label.shape != image.shape or affine.shape != (4, 4):
        raise DataError(f"{rec.cached}: label shape {label.shape}, affine {affine.shape} for image"
                        f" {image.shape}; expected the image's shape and a 4x4 affine")
    return Volume(image, label, affine, rec.image, background, rec.subject)


def find_records(cache_dir: Path, require_masks: bool = True) -> list[SubjectRecord]:
    """The subjects of a cache folder, with `cached` set (what `discover_subjects` returns).

    Every cached subject has its mask, so `require_masks` changes nothing.

    Raises:
        DataError: the manifest is not JSON or not a complete cache manifest; a listed
            file is missing or its size differs from the manifest's (truncated).
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir / MANIFEST_NAME)
    where = cache_dir / MANIFEST_NAME
    if manifest.get("complete") is not True:
        raise DataError(f"{where}: the cache build was interrupted (complete: false); {REBUILD_HINT}")
    source_root = Path(str(manifest.get("source_root", "")))
    records = []
    for i, entry in enumerate(manifest.get("subjects", [])):
        try:
            path = cache_dir / entry["file"]
            size = int(entry["file_size"])
            rec = SubjectRecord(str(entry["subject"]), str(entry["session"]),
                                source_root / entry["image"]["path"],
                                source_root / entry["mask"]["path"], cached=path)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed subject entry {i} ({type(exc).__name__}: {exc});"
                            f" expected file, file_size, subject, session, image, mask") from None
        if not path.is_file():
            raise DataError(f"{path}: cache file listed in {where.name} not found; {REBUILD_HINT}")
        if path.stat().st_size != size:
            raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says {size}"
                            f" (truncated or replaced); {REBUILD_HINT}")
        records.append(rec)
    if not records:
        raise DataError(f"{where}: no subjects listed; expected a cache built from a data tree")
    return sorted(records)


def read_manifest(where: Path) -> dict:
    """The manifest at `where`, checked to be a cache manifest of this version."""
    try:
        manifest = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: unreadable cache manifest ({type(exc).__name__}: {exc});"
                        f" expected the JSON that `orchestrator data cache` writes") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"{where}: not a cache manifest; expected \"format\": \"{CACHE_FORMAT}\"")
    if manifest.get("version") != CACHE_VERSION or not isinstance(manifest.get("subjects"), list):
        raise DataError(f"{where}: cache version {manifest.get('version')!r}; expected {CACHE_VERSION}"
                        f" with a subjects list; {REBUILD_HINT}")
    return manifest


def load_sdm(path: Path) -> np.ndarray:
    """The signed distance map of a cached subject as float32 (`distance.signed_distance_map`).

    Raises:
        DataError: as `load`.
    """
    with _open(path) as f:
        return np.asarray(_read(f, path, "sdm"), dtype=np.float32)


class CachedVolume:
    """A cached subject, read patch by patch (PatchDataset's prepared volume for a cache).

    It looks like the volume padded (centred, with the background value; label 0) to at
    least `patch_size_vox`, as the in-memory one, so sampling is the same function of the
    random draws. Only `lesion_flat` is held in memory; patches are read from the file
    through a per-process pool of open handles (never pickled, reopened after a fork).
    """

    def __init__(self, path: Path, patch_size_vox: tuple[int, int, int]) -> None:
        self.path = Path(path)
        f = _handle(self.path)
        self.stored_shape = tuple(int(s) for s in _dataset(f, self.path, "image").shape)
        pad = [max(0, p - s) for p, s in zip(patch_size_vox, self.stored_shape)]
        self.pad_lo = np.array([p // 2 for p in pad], dtype=np.intp)
        self.shape = tuple(s + p for s, p in zip(self.stored_shape, pad))
        self.background = float(_attr(f, self.path, "background"))
        flat = np.asarray(_read(f, self.path, "lesion_flat"), dtype=np.intp)
        if any(pad):
            coords = np.unravel_index(flat, self.stored_shape)
            flat = np.ravel_multi_index(tuple(c + o for c, o in zip(coords, self.pad_lo)), self.shape)
        self.lesion_flat = np.asarray(flat, dtype=np.intp)

    def crop(self, start: np.ndarray, size: tuple[int, ...],
             names: tuple[str, ...] = ("image", "label")) -> tuple[np.ndarray, ...]:
        """The box [start, start + size) of the padded grid, one array per dataset name."""
        f = _handle(self.path)
        lo = np.asarray(start, dtype=np.intp) - self.pad_lo
        hi = lo + np.asarray(size, dtype=np.intp)
        src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, self.stored_shape)
        src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        inside = bool((lo >= 0).all() and (hi <= self.stored_shape).all())
        out = []
        for name in names:
            view = _mapped(f, self.path, name)
            part = np.array(view[src]) if view is not None else _read(f, self.path, name, src)
            if inside:
                out.append(part)
                continue
            fill = self.background if name == "image" else 0
            arr = np.full(tuple(size), fill, dtype=part.dtype)
            arr[tuple(slice(a - o, b - o) for a, b, o in zip(src_lo, src_hi, lo))] = part
            out.append(arr)
        return tuple(out)


_OPEN: OrderedDict[Path, tuple[Any, tuple[int, int], dict[str, np.ndarray | None]]] = OrderedDict()
_OPEN_PID = [os.getpid()]


def _handle(path: Path):
    """An open read-only h5py.File from this process's pool (LRU, `MAX_OPEN_FILES`).

    A file replaced since it was opened (a rebuild) is reopened; after a fork the
    parent's handles are dropped, as HDF5 handles must not be shared between processes.
    """
    if _OPEN_PID[0] != os.getpid():
        _OPEN.clear()
        _OPEN_PID[0] = os.getpid()
    try:
        stat = os.stat(path)
        ident = (stat.st_ino, stat.st_mtime_ns)
    except OSError:
        ident = (-1, -1)  # _open raises the DataError
    if path in _OPEN:
        handle, seen, _ = _OPEN[path]
        if seen == ident:
            _OPEN.move_to_end(path)
            return handle
        del _OPEN[path]
        handle.close()
    handle = _open(path)
    _OPEN[path] = (handle, ident, {})
    while len(_OPEN) > MAX_OPEN_FILES:
        _OPEN.popitem(last=False)[1][0].close()
    return handle


def _mapped(f, path: Path, name: str) -> np.ndarray | None:
    """A read-only memmap of dataset `name` of the pooled file `f`, or None where the
    dataset is not stored contiguous and uncompressed (a chunked cache: read by h5py)."""
    views = _OPEN[path][2] if path in _OPEN and _OPEN[path][0] is f else {}
    if name not in views:
        ds = _dataset(f, path, name)
        offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
        view = None
        if offset is not None and ds.dtype.isnative:
            try:
                view = np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)
            except (OSError, ValueError) as exc:  # shorter than the dataset says: truncated
                raise DataError(f"{path}: damaged '{name}' dataset ({exc}); expected a complete"
                                f" cache file - {REBUILD_HINT}") from None
        views[name] = view
    return views[name]


def _open(path: Path):
    import h5py  # deferred: only cached data needs h5py

    if not Path(path).is_file():
        raise DataError(f"{path}: cache file not found; {REBUILD_HINT}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: unreadable or truncated HDF5 ({reason}); expected a complete"
                        f" cache file - {REBUILD_HINT}") from None


def _dataset(f, path: Path, name: str):
    if name not in f:
        raise DataError(f"{path}: no '{name}' dataset; expected {', '.join(DATASETS)} - {REBUILD_HINT}")
    return f[name]


def _attr(f, path: Path, name: str):
    if name not in f.attrs:
        raise DataError(f"{path}: no '{name}' attribute; expected a cache file - {REBUILD_HINT}")
    return f.attrs[name]


def _read(f, path: Path, name: str, box: Any = ()) -> np.ndarray:
    """`f[name][box]`, a damaged file's read error as one DataError line."""
    ds = _dataset(f, path, name)
    try:
        return ds[box]
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: damaged '{name}' dataset ({reason}); expected a complete"
                        f" cache file - {REBUILD_HINT}") from None
