"""Every kind of bad input: one line on stderr naming the file or field and what was
expected, exit code 2, no traceback, and nothing written (the watched folders as before).

The command line's own entry point (`orchestrator.cli:main`) runs in this process, with
`sys.argv` set, so that 25 kinds cost no interpreter start-up each.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import reliability_kit as kit
import torch
from conftest import REPO, replaced
from tiny_plans import one_stage_curriculum, quick_tiny_plan

from orchestrator.training.checkpoints import load_checkpoint, save_checkpoint

S1, S2 = "stage1_basic_cnn", "stage2_cnn_attention"
IMG = "*_T1w.nii.gz"
MASK = "*_mask.nii.gz"

one_thread = kit.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots` with its content digest (a folder: "dir")."""
    seen = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted([root, *root.rglob("*")]):
            seen[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


# --- the inputs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A real final.pt of the tiny stage 1 (one epoch of 2 steps), trained on RAS images."""
    from orchestrator.training.trainer import run_stage

    _, path = quick_tiny_plan(tmp_path_factory.mktemp("trained"), tiny_data, "t")
    return Path(run_stage(path, S1)["final"])


def _data(tmp: Path, tiny: Path, break_it: Callable[[Path, Path], None] | None = None) -> Path:
    data = tmp / "data"
    shutil.copytree(tiny, data)
    if break_it:
        break_it(next(data.rglob(IMG)), next(data.rglob(MASK)))
    return data


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    new = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(new, img.affine if affine is None else affine), path)


def _mask_values(_img: Path, mask: Path) -> None:
    m = np.asarray(nib.load(mask).dataobj).copy()
    m[0, 0, 0] = 2
    _rewrite(mask, m)


def _nan(img: Path, _mask: Path) -> None:
    a = np.asarray(nib.load(img).dataobj, dtype=np.float32).copy()
    a[5, 5, 5] = np.nan
    _rewrite(img, a)


def _shifted(path: Path) -> np.ndarray:
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 2.0
    return affine


DATA_CASES: dict[str, tuple[Callable[[Path, Path], None] | None, str]] = {
    "truncated .nii.gz": (lambda img, _m: img.write_bytes(img.read_bytes()[:300]),
                          r"T1w\.nii\.gz: unreadable or truncated NIfTI .*expected a complete"),
    "not a NIfTI": (lambda img, _m: img.write_bytes(b"plain text, not an image\n" * 20),
                    r"T1w\.nii\.gz: unreadable or truncated NIfTI"),
    "image/mask shape mismatch": (lambda _i, m: _rewrite(m, np.zeros((30, 32, 32), np.uint8)),
                                  r"mask\.nii\.gz: mask shape \(30, 32, 32\) differs .*expected the same"),
    "affine mismatch": (lambda _i, m: _rewrite(m, affine=_shifted(m)),
                        r"mask\.nii\.gz: mask affine differs .*expected the same voxel-to-world"),
    "mask values other than 0/1": (_mask_values, r"mask\.nii\.gz: non-binary mask.*expected only 0 and 1"),
    "NaN voxels": (_nan, r"T1w\.nii\.gz: 1 NaN/Inf voxels; expected finite"),
    "4D image": (lambda img, _m: _rewrite(img, np.ones((32, 32, 32, 2), np.float32)),
                 r"T1w\.nii\.gz: 4D image of shape \(32, 32, 32, 2\); expected a 3D volume"),
    "empty directory": (None, r"no T1w images found; searched"),
    "wrong directory": (None, r"dataset folder not found; expected a folder"),
}


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_bad_data_for_the_cache(kind: str, tmp_path: Path, tiny_data: Path, capsys) -> None:
    """`data cache` (the command that writes) checks every subject before writing one."""
    break_it, message = DATA_CASES[kind]
    if kind == "empty directory":
        data = tmp_path / "data"
        data.mkdir()
    elif kind == "wrong directory":
        data = tmp_path / "no-such-data"
    else:
        data = _data(tmp_path, tiny_data, break_it)
    out = tmp_path / "cache"
    _answered(["data", "cache", str(data), "--out", str(out)], [data, out], message, capsys)


def _curriculum(tmp: Path, stage1_extra: str = "", text: str | None = None) -> Path:
    """The one-stage tiny curriculum (planning it takes seconds), `stage1_extra` added to
    its stage entry, or `text` instead of it."""
    path = one_stage_curriculum(tmp, "cur")
    body = replaced(path.read_text(), "stage1_basic_cnn.yaml\n", f"stage1_basic_cnn.yaml\n{stage1_extra}")
    path.write_text(text if text is not None else body)
    return path


PLAN_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "YAML syntax error": (lambda t: ["--curriculum", str(_curriculum(t, text="name: [one\nstages: {"))],
                          r"cur\.yaml"),
    "unknown key": (lambda t: ["--curriculum", str(_curriculum(
        t, "    overrides: {max_epoch: 3}\n"))], r"unknown key 'max_epoch' \(did you mean 'max_epochs'\?\)"),
    "wrong type": (lambda t: ["--curriculum", str(_curriculum(
        t, "    overrides: {max_epochs: many}\n"))], r"max_epochs.*integer"),
    "negative --target-mem": (lambda t: ["--target-mem", "-3"],
                              r"--target-mem: expected a positive number of GB.*'-3'"),
    "absurd --target-mem": (lambda t: ["--target-mem", "1e9"],
                            r"--target-mem: expected a positive number of GB up to 16384, got '1e9'"),
    "a budget nothing fits": (lambda t: ["--curriculum", str(_curriculum(t)), "--target-mem", "0.01"],
                              r"nothing fits in 0\.01 GB for stage1_basic_cnn.*use --target-mem"),
    "cluster profile with an unknown partition key": (
        lambda t: ["--cluster", str(_profile(t))], r"cl\.yaml: unknown key 'partiton' \(did you mean"),
}


def _profile(tmp: Path) -> Path:
    text = (REPO / "envs" / "clusters" / "generic-slurm.yaml").read_text()
    path = tmp / "cl.yaml"
    path.write_text(replaced(text, "\npartition:", "\npartiton:"))
    return path


@pytest.mark.parametrize("kind", list(PLAN_CASES))
def test_bad_config_for_plan(kind: str, tmp_path: Path, tiny_data: Path, capsys) -> None:
    make, message = PLAN_CASES[kind]
    runs = tmp_path / "runs"
    argv = ["plan", "--device", "cpu", "--run", "r", "--runs-dir", str(runs), "--data", str(tiny_data)]
    extra = make(tmp_path)
    if "--target-mem" not in extra:
        extra += ["--target-mem", "2"]
    if "--curriculum" not in extra:
        extra += ["--curriculum", str(_curriculum(tmp_path))]
    _answered(argv + extra, [runs, tiny_data], message, capsys)


class _Payload:
    """Unpickling this creates `path` (what a malicious checkpoint would do instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.path), "w"))


def _other_family(tmp: Path, trained: Path) -> Path:
    ckpt = load_checkpoint(trained)
    bad = tmp / "resnet.pt"
    save_checkpoint(bad, {**ckpt, "arch": "resnet50", "model_kwargs": {}})
    return bad


def _truncated(tmp: Path, trained: Path) -> Path:
    bad = tmp / "truncated.pt"
    bad.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    return bad


def _pickled(tmp: Path, trained: Path) -> Path:
    bad = tmp / "shared.pt"
    torch.save({**load_checkpoint(trained), "note": _Payload(tmp / "payload-ran")}, bad)
    return bad


CKPT_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "a checkpoint of another model family": (
        _other_family, r"resnet\.pt: does not match its model \(unknown model arch 'resnet50'"),
    "a truncated checkpoint": (_truncated, r"truncated\.pt: unreadable checkpoint"),
    "a checkpoint carrying a pickled object": (
        _pickled, r"shared\.pt: refused, it holds a pickled object \(\S*open\).*never allowed to run code"),
}


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("kind", list(CKPT_CASES))
def test_bad_checkpoint(kind: str, command: str, tmp_path: Path, tiny_data: Path, trained: Path,
                        capsys) -> None:
    make, message = CKPT_CASES[kind]
    ckpt = make(tmp_path, trained)
    out = tmp_path / "out"
    if command == "predict":
        image = next(tiny_data.rglob(IMG))
        argv = ["predict", "--checkpoint", str(ckpt), "--input", str(image), "--out", str(out / "p.nii.gz")]
    else:
        argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(out)]
    _answered(argv, [tmp_path, tiny_data], message, capsys, count=command == "predict")
    assert not (tmp_path / "payload-ran").exists(), "the checkpoint's pickled payload ran"


def test_predict_of_another_orientation(tmp_path: Path, tiny_data: Path, trained: Path, capsys) -> None:
    image = tmp_path / "lps_T1w.nii.gz"
    src = nib.load(next(tiny_data.rglob(IMG)))  # the same scan stored LPS: x and y reversed
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[::-1, ::-1], src.affine @ _flip_axes(src)), image)
    assert "".join(nib.aff2axcodes(nib.load(image).affine)) == "LPS"
    _answered(["predict", "--checkpoint", str(trained), "--input", str(image)], [tmp_path],
              r"lps_T1w\.nii\.gz: orientation LPS, but .*final\.pt was trained on RAS images; "
              r"expected RAS", capsys)


def _flip_axes(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel-to-voxel affine of reversing the first two axes."""
    flip = np.eye(4)
    for axis in (0, 1):
        flip[axis, axis] = -1.0
        flip[axis, 3] = img.shape[axis] - 1
    return flip


def test_handoff_between_incompatible_stages(tmp_path: Path, tiny_data: Path, trained: Path,
                                             capsys) -> None:
    """Stage 2 starts from stage 1's final.pt; here that file holds an LCNN."""
    import models

    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, "h")
    lcnn = plan.stage("lcnn")
    model = models.build_model("lcnn", **lcnn.model_kwargs())
    src = plan.run_dir / S1 / "checkpoints" / "final.pt"
    save_checkpoint(src, {"stage": "lcnn", "arch": "lcnn", "model_kwargs": lcnn.model_kwargs(),
                          "input_size_vox": list(lcnn.input_size_vox), "model": model.state_dict()})
    _answered(["run-stage", "--plan", str(path), "--stage", S2], [plan.run_dir],
              r"final\.pt: a lcnn checkpoint \(init_from stage1_basic_cnn; stage stage2_cnn_attention "
              r"trains resunet3d\) - a hand-off needs a checkpoint of the same model family", capsys)


@pytest.mark.parametrize("command", ["status", "resume", "cancel"])
def test_a_run_that_does_not_exist(command: str, tmp_path: Path, tiny_data: Path, capsys) -> None:
    runs = tmp_path / "runs"
    quick_tiny_plan(runs, tiny_data, "real")
    _answered([command, "ghost", "--runs-dir", str(runs)], [runs],
              r"ghost: no such run \(no plan\.yaml\); expected one of the runs in .*\['real'\]", capsys,
              count=command == "status")


def test_hand_edited_invalid_plan(tmp_path: Path, tiny_data: Path, capsys) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, "edited")
    path.write_text(replaced(path.read_text(), "batch_size: 2", "batch_size: -2", 1))
    _answered(["run-stage", "--plan", str(path), "--stage", S1], [plan.run_dir],
              r"plan\.yaml: .*batch_size.*greater than 0", capsys)


def test_fresh_of_a_stage_not_in_the_plan(tmp_path: Path, tiny_data: Path, capsys) -> None:
    plan, _ = quick_tiny_plan(tmp_path / "runs", tiny_data, "f")
    _answered(["resume", "f", "--runs-dir", str(tmp_path / "runs"), "--fresh", "stage9"], [plan.run_dir],
              r"--fresh stage9: no such stage in .*plan\.yaml; expected one of stage1_basic_cnn", capsys,
              count=False)


def _answered(argv: list[str], watched: list[Path], message: str, capsys, count: bool = True) -> None:
    """Run the command: exit 2, one line on stderr matching `message`, nothing written."""
    before = snapshot(*watched)
    code, out, err = kit.run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    import re

    assert re.search(message, lines[0]), f"{message!r} not in {lines[0]!r}"
    assert snapshot(*watched) == before, "the command wrote or changed files"
    if count:
        kit.TALLY["kinds"] += 1
