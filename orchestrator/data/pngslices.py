"""Slice folders of PNG files, the layout many 2D stroke datasets (and LCNN users) have.

::

    <root>/images/<patient>/<NNN>.png     axial slices of one scan, numbered in order
    <root>/masks/<patient>/<NNN>.png      the lesion mask of each slice, same numbers

A patient is read as one volume, slice k being the k-th file in numeric order, so that the
LCNN's slice stacks (`orchestrator.data.slices`) take 2T+1 adjacent slices from it just as
from a NIfTI scan. A PNG of shape (H, W) becomes `image[:, :, k] = png.T` (X = columns,
Y = rows; `slice_stack` transposes back to (H, W)). Colour PNGs are converted to grey
(Pillow's "L" mode); masks must hold two values, 0 and one other (1 or 255 usually).
The affine is the identity: PNG slices carry no geometry.

Like every layout module it offers `find_records(root, require_masks)` and `load(rec)`.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from orchestrator.data.records import SubjectRecord, Volume
from orchestrator.data.zscore import zscore
from orchestrator.errors import DataError

IMAGES_DIR, MASKS_DIR = "images", "masks"
_NUMBER = re.compile(r"(\d+)")


def is_png_tree(root: Path) -> bool:
    """True when `root` holds `images/<patient>/*.png` (the layout above)."""
    images = Path(root) / IMAGES_DIR
    return images.is_dir() and any(images.glob("*/*.png"))


def find_records(root: Path, require_masks: bool = True) -> list[SubjectRecord]:
    """One record per patient folder; `image` and `mask` are the two slice folders.

    Raises:
        DataError: with `require_masks`, a patient has no mask folder, or a slice no mask
            file (the message names the file expected).
    """
    root = Path(root)
    records = []
    for folder in sorted(p for p in (root / IMAGES_DIR).iterdir() if p.is_dir()):
        slices = _slice_files(folder)
        if not slices:
            continue
        mask_dir: Path | None
        mask_dir = root / MASKS_DIR / folder.name
        if not mask_dir.is_dir():
            if require_masks:
                raise DataError(f"{folder}: no mask folder; expected {mask_dir} with one PNG per slice")
            mask_dir = None
        elif require_masks:
            for f in slices:
                if not (mask_dir / f.name).is_file():
                    raise DataError(f"{f}: mask slice not found; expected {mask_dir / f.name}")
        records.append(SubjectRecord(folder.name, "", folder, mask_dir))
    if not records:
        raise DataError(f"{root / IMAGES_DIR}: no patient folder holds PNG slices; expected "
                        f"{IMAGES_DIR}/<patient>/<NNN>.png")
    return records


def load(rec: SubjectRecord) -> Volume:
    """One patient's slices as a z-scored Volume (identity affine).

    Raises:
        DataError: as `read_png_volume`, or an all-zero or constant image.
    """
    data, label = read_png_volume(rec.image, rec.mask)
    image, background = zscore(data, rec.image)
    return Volume(image, label, np.eye(4), rec.image, background, rec.subject)


def read_png_volume(image_dir: Path, mask_dir: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, Y, Z) float32 intensities and uint8 {0, 1} mask (or None) of one patient.

    Raises:
        DataError: an unreadable PNG, slices of different sizes, a mask slice whose size
            differs from its image slice, or a mask with more than two values.
    """
    files = _slice_files(Path(image_dir))
    if not files:
        raise DataError(f"{image_dir}: no PNG slices; expected <NNN>.png files")
    planes = [_read_png(f) for f in files]
    shape = planes[0].shape
    for f, p in zip(files, planes):
        if p.shape != shape:
            raise DataError(f"{f}: slice of {p.shape[0]}x{p.shape[1]} pixels; expected "
                            f"{shape[0]}x{shape[1]} like {files[0].name}")
    image = np.stack([p.T for p in planes], axis=2).astype(np.float32)
    if mask_dir is None:
        return image, None
    masks = []
    for f in files:
        m = _read_png(Path(mask_dir) / f.name)
        if m.shape != shape:
            raise DataError(f"{Path(mask_dir) / f.name}: mask of {m.shape[0]}x{m.shape[1]} pixels; "
                            f"expected {shape[0]}x{shape[1]} like its image {f}")
        values = np.unique(m)
        if values.size > 2 or (values.size == 2 and values[0] != 0):
            raise DataError(f"{Path(mask_dir) / f.name}: mask values {values[:5].tolist()}; expected "
                            "0 for background and one other value (1 or 255) for lesion")
        masks.append((m > 0).T)
    return image, np.stack(masks, axis=2).astype(np.uint8)


def _slice_files(folder: Path) -> list[Path]:
    """The folder's *.png in numeric order of the first number in the name (then by name)."""
    def key(p: Path) -> tuple[int, str]:
        m = _NUMBER.search(p.stem)
        return (int(m.group(1)) if m else -1, p.name)

    return sorted(folder.glob("*.png"), key=key)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # deferred: only PNG data needs Pillow

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L") if im.mode not in ("L", "I;16", "I") else im)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; expected a PNG slice") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable PNG ({exc}); expected a PNG image") from None
