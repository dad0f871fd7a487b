"""`evaluate_checkpoint` and `predict_paths` on a real (untrained) checkpoint and real NIfTI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from orchestrator.errors import CheckpointError, DataError
from orchestrator.training.evaluate import evaluate_checkpoint
from orchestrator.training.metrics import SUMMARY_METRICS
from orchestrator.training.predict import predict_paths

MODEL_KWARGS = {"base_filters": 4, "levels": 4, "input_size_vox": [32, 32, 32]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint at runs/r/s/checkpoints/final.pt, dataset of 2 subjects of 32^3)."""
    import models
    from orchestrator.data.synth import synthesize_atlas
    from orchestrator.training.checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = models.build_model("resunet3d", **MODEL_KWARGS)
    ckpt = root / "runs" / "r" / "s" / "checkpoints" / "final.pt"
    save_checkpoint(ckpt, {"stage": "s", "arch": "resunet3d", "model_kwargs": MODEL_KWARGS,
                           "input_size_vox": [32, 32, 32], "model": model.state_dict(), "best_dice": 0.0})
    synthesize_atlas(root / "data", subjects=2, shape_vox=(32, 32, 32), seed=0)
    return ckpt, root / "data"


def test_evaluate_writes_report_csv_overlays_predictions(setup: tuple[Path, Path]) -> None:
    ckpt, data = setup
    calls: list[tuple[int, int]] = []
    result = evaluate_checkpoint(ckpt, data, progress=lambda done, total: calls.append((done, total)))
    out = ckpt.parent.parent / "eval"  # the stage's eval/ folder by default
    assert Path(result["out_dir"]) == out.resolve() and calls == [(1, 2), (2, 2)]
    report = json.loads((out / "report.json").read_text())
    assert report["n_subjects"] == 2 and report["arch"] == "resunet3d" and report["stage"] == "s"
    assert set(SUMMARY_METRICS) <= set(report["metrics"])
    for name in SUMMARY_METRICS:
        assert set(report["metrics"][name]) == {"mean", "median", "std", "min", "max"}
        assert all(name in row for row in report["subjects"])
    rows = list(csv.DictReader((out / "subjects.csv").open()))
    assert [r["subject"] for r in rows] == ["sub-r001s001", "sub-r001s002"]
    assert {"dice", "iou", "hd95_mm", "lesion_f1", "volume_diff_mm3", "abs_volume_diff_vox"} <= set(rows[0])
    for row in report["subjects"]:
        sid = f"{row['subject']}_{row['session']}"
        assert (out / "overlays" / f"{sid}.png").read_bytes()[:4] == b"\x89PNG"
        pred = nib.load(out / "predictions" / f"{sid}_pred.nii.gz")
        assert pred.shape == (32, 32, 32) and pred.get_data_dtype() == np.uint8


def test_predict_round_trips_a_subject(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = setup
    image = sorted(data.rglob("*_T1w.nii.gz"))[0]
    [written] = predict_paths(ckpt, image, tmp_path / "one" / "mask.nii.gz")
    assert written == tmp_path / "one" / "mask.nii.gz"
    src, pred = nib.load(image), nib.load(written)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / image.name).write_bytes(image.read_bytes())
    [beside] = predict_paths(ckpt, folder)
    assert beside == folder / image.name.replace("_T1w.nii.gz", "_T1w_pred.nii.gz")
    assert predict_paths(ckpt, folder, tmp_path / "out") == [tmp_path / "out" / beside.name]  # _pred skipped


def test_predict_errors_name_the_file(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = setup
    with pytest.raises(DataError, match=r"missing\.nii\.gz: input not found"):
        predict_paths(ckpt, tmp_path / "missing.nii.gz")
    broken = tmp_path / "broken_T1w.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"broken_T1w\.nii\.gz: unreadable or truncated NIfTI"):
        predict_paths(ckpt, broken)
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint not found"):
        predict_paths(tmp_path / "nope.pt", broken)
