"""Brain-anatomy synthetic subjects on the real MNI152 2009 template, as an ATLAS-style tree.

The template (ICBM 2009a nonlinear symmetric, 1 mm, skull-stripped T1 with grey and white
matter probability maps) ships inside nilearn's wheel on PyPI. On first use it is fetched
with `pip download nilearn==NILEARN_VERSION --no-deps` (pip's own configuration: index,
proxy, local mirror), the three files are taken out of the wheel and kept under
$ORCHESTRATOR_TEMPLATE_DIR, else $XDG_CACHE_HOME/orchestrator/mni152 (~/.cache/...). It is
never committed to the repository.

A subject is the template, 2x2x2 block-averaged to 2 mm (98x116x94), warped by a smooth
random deformation (a few mm) and a small random affine, with a per-subject contrast
gamma, 1-3 hypo-intense lesions inside the brain (ATLAS R2.0-like sizes: log-normal,
0.05-60 cm^3, mostly in one hemisphere), a smooth bias field and Rician-like noise.
The files and their names are those of `synth.synthesize_atlas`.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from orchestrator.data import synth
from orchestrator.data.nifti import load_image
from orchestrator.data.records import SubjectRecord
from orchestrator.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

NILEARN_VERSION = "0.14.1"
_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_FILES = {"t1": _MEMBER.format("t1"), "gm": _MEMBER.format("gm"), "wm": _MEMBER.format("wm")}
VOXEL_MM = 2.0
MNI152_SHAPE_VOX = (98, 116, 94)  # the 1 mm template (197x233x189) in 2x2x2 blocks
LESION_MEDIAN_CM3 = 3.0
LESION_LOG_SIGMA = 1.5
LESION_RANGE_CM3 = (0.05, 60.0)
WM_LEVEL = float(synth.T1_BY_TISSUE[synth.WM])  # white matter's median after normalising


class TemplateUnavailable(ConfigError):
    """The MNI152 template is neither cached nor downloadable."""


def template_dir() -> Path:
    """Where the template files are cached."""
    if os.environ.get("ORCHESTRATOR_TEMPLATE_DIR"):
        return Path(os.environ["ORCHESTRATOR_TEMPLATE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "orchestrator" / "mni152"


def cached_template() -> dict[str, Path] | None:
    """The cached template files {"t1", "gm", "wm"}, or None if any is missing."""
    paths = {k: template_dir() / Path(m).name for k, m in TEMPLATE_FILES.items()}
    return paths if all(p.is_file() for p in paths.values()) else None


def fetch_template(timeout_s: float = 300.0) -> dict[str, Path]:
    """The template files, downloaded (nilearn's wheel, no dependencies) on first use.

    Raises:
        TemplateUnavailable: pip cannot get the wheel (offline, no index), or the wheel
            lacks the files.
    """
    have = cached_template()
    if have:
        return have
    dest = template_dir()
    with tempfile.TemporaryDirectory(prefix="mni152-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"nilearn=={NILEARN_VERSION}",
               "--no-deps", "--only-binary", ":all:", "-q", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise TemplateUnavailable(f"MNI152 template: `pip download nilearn=={NILEARN_VERSION}`"
                                      f" failed ({type(err).__name__}); expected network access to"
                                      f" PyPI, or the files in {dest}") from None
        wheels = sorted(Path(tmp).glob("nilearn-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1][:160]
            raise TemplateUnavailable(f"MNI152 template: `pip download nilearn=={NILEARN_VERSION}`"
                                      f" failed ({last}); expected network access to PyPI, or the"
                                      f" files in {dest}")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = set(wheel.namelist())
            for member in TEMPLATE_FILES.values():
                if member not in names:
                    raise TemplateUnavailable(f"{wheels[0].name}: no {member}; expected nilearn's "
                                              "wheel to ship the MNI152 2009 template")
                part = dest / (Path(member).name + ".part")
                with wheel.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
                part.replace(dest / Path(member).name)
    logger.info("MNI152 template cached in %s", dest)
    return cached_template() or {}


def load_template(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    """The template at 2 mm: "t1" (normalised, WM median = WM_LEVEL), "gm", "wm" in [0, 1],
    and "affine"."""
    out: dict[str, np.ndarray] = {}
    affine = None
    for key, path in paths.items():
        img = load_image(path)
        data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        crop = [n - n % 2 for n in data.shape]
        data = data[:crop[0], :crop[1], :crop[2]]
        out[key] = data.reshape(crop[0] // 2, 2, crop[1] // 2, 2, crop[2] // 2, 2).mean((1, 3, 5))
        affine = img.affine
    if affine is None or out["t1"].max() <= 0:
        raise DataError(f"{paths.get('t1')}: empty MNI152 template; expected a T1 image")
    scaled = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    scaled[:3, 3] = affine[:3, 3] + 0.5 * np.diag(affine)[:3]  # centre of each 2x2x2 block
    out["t1"] *= WM_LEVEL / float(np.median(out["t1"][out["wm"] > 0.9]))
    out["affine"] = scaled
    return out


def synthesize_mni152(out_dir: Path, subjects: int = 4, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> list[SubjectRecord]:
    """Write `subjects` brain-anatomy subjects under `out_dir` (layout of `synthesize_atlas`).

    Subject k is drawn from `np.random.default_rng([seed, k])`: the output is a function of
    the seed and the template, and fewer subjects give a prefix of more.

    Raises:
        TemplateUnavailable: no cached template and no way to download it.
        ConfigError: `subjects` < 1.
    """
    if subjects < 1:
        raise ConfigError(f"synthetic data: subjects {subjects}; expected at least 1")
    template = load_template(fetch_template())
    records = []
    for k in range(subjects):
        image, mask = synthesize_subject(template, (seed, k))
        records.append(synth.write_subject(Path(out_dir), k, image, mask, template["affine"]))
        if progress is not None:
            progress(k + 1, subjects)
    return sorted(records)


def synthesize_subject(template: dict[str, np.ndarray], seed) -> tuple[np.ndarray, np.ndarray]:
    """One subject (image float32, lesion mask uint8) on the 2 mm template."""
    rng = np.random.default_rng(seed)
    shape = template["t1"].shape
    coords = _warp_coords(rng, shape)
    warp = lambda a: ndimage.map_coordinates(a, coords, order=1, mode="constant")  # noqa: E731
    t1, gm, wm = warp(template["t1"]), warp(template["gm"]), warp(template["wm"])
    brain = t1 > 0.05 * WM_LEVEL
    image = np.where(brain, (np.maximum(t1, 0) / WM_LEVEL) ** rng.uniform(0.85, 1.15) * WM_LEVEL,
                     0.0).astype(np.float32)
    tissue = np.zeros(shape, dtype=np.uint8)  # labels as the phantoms': lesions go in brain tissue
    tissue[brain] = synth.CSF
    tissue[brain & (gm > 0.5)] = synth.GM
    tissue[brain & (wm > 0.5)] = synth.WM
    mask = _draw_lesions(rng, tissue, image)
    image *= synth._bias_field(rng, shape)
    image += np.float32(0.03 * WM_LEVEL) * rng.standard_normal(shape, dtype=np.float32)
    np.abs(image, out=image)
    image[~brain] = 0.0
    image *= np.float32(rng.uniform(300.0, 800.0))  # arbitrary scanner units
    return image, mask


def _warp_coords(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Sampling coordinates (3, X, Y, Z): a small affine about the centre (+-4 % scale,
    +-4 degrees) plus a smooth displacement of ~2 mm (1 voxel) rms, features ~20 mm wide."""
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    angles = np.deg2rad(rng.uniform(-4, 4, size=3))
    mat = Rotation.from_euler("xyz", angles).as_matrix() * rng.uniform(0.96, 1.04, size=3)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None]
    coords = (mat.astype(np.float32) @ grid) + centre[:, None]
    coords = coords.reshape(3, *shape)
    for axis in range(3):
        coords[axis] += 1.0 * synth._smooth_field(rng, shape, step_vox=10.0)
    return coords


def _draw_lesions(rng: np.random.Generator, tissue: np.ndarray, image: np.ndarray) -> np.ndarray:
    """1-3 lesions of ATLAS-like volume (cm^3 at VOXEL_MM), painted into `image` in place."""
    mask = np.zeros(tissue.shape, dtype=np.uint8)
    voxel_cm3 = VOXEL_MM ** 3 / 1000.0
    brain_vox = int(np.count_nonzero(tissue))
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    side = float(rng.choice([-1.0, 1.0]))
    for k in range(count):
        cm3 = float(np.clip(rng.lognormal(math.log(LESION_MEDIAN_CM3), LESION_LOG_SIGMA),
                            *LESION_RANGE_CM3))
        lesion_side = side if rng.random() < 0.85 else -side
        tissues = (synth.WM,) if k == 0 else (synth.GM, synth.WM)
        centre = synth._lesion_centre(rng, tissue, lesion_side, tissues)
        if centre is not None:
            target = min(max(cm3 / voxel_cm3, 6.0), 0.1 * brain_vox)  # a small brain: capped
            synth._paint_lesion(rng, tissue, image, mask, centre, target)
    if not mask.any():
        synth._paint_lesion(rng, tissue, image, mask, np.array(tissue.shape) // 2, 64.0)
    return mask
