"""nnU-Net-grade inference (issue 26): test-time mirroring (on for evaluate/predict, off in
training validation), and post-processing chosen on validation, recorded beside the run's
best.pt and applied by `evaluate --run` and `predict --run`."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_runner import invoke
from tiny_plans import quick_tiny_plan
from torch import nn

import models
from orchestrator.data.sources import discover_subjects
from orchestrator.errors import ConfigError
from orchestrator.training.checkpoints import save_checkpoint
from orchestrator.training.postprocess import (
    POSTPROCESS_FILE,
    apply_postprocessing,
    choose_postprocessing,
    keep_largest_component,
    remove_small_components,
)
from orchestrator.training.validation import mirrored_logits, predict_volume

MODEL_KWARGS = {"base_filters": 4, "levels": 4, "input_size_vox": [32, 32, 32]}
S1 = "stage1_basic_cnn"


def _asymmetric() -> nn.Module:
    """A conv with random (so not mirror-symmetric) kernels: not mirror-equivariant."""
    torch.manual_seed(0)
    return nn.Conv3d(1, 2, kernel_size=3, padding=1).eval()


def test_mirroring_is_the_mean_of_the_eight_flipped_passes() -> None:
    model, x = _asymmetric(), torch.randn(2, 1, 8, 10, 12)
    with torch.no_grad():
        plain, mirrored = model(x), mirrored_logits(model, x, (0, 1, 2))
        by_hand = torch.stack([torch.flip(model(torch.flip(x, d)), d) if d else model(x)
                               for k in range(4) for d in itertools.combinations((2, 3, 4), k)])
    assert by_hand.shape[0] == 8
    assert not torch.allclose(mirrored, plain, atol=1e-3)  # mirroring changes the output
    assert torch.allclose(mirrored, by_hand.mean(0), atol=1e-6)
    assert torch.equal(mirrored_logits(model, x, ()), plain)  # no axes: the plain pass


def test_predict_volume_mirrors_whole_windows() -> None:
    model = _asymmetric()
    image = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    cpu = torch.device("cpu")
    plain = predict_volume(model, image, (16, 16, 16), cpu, None)
    mirrored = predict_volume(model, image, (16, 16, 16), cpu, None, mirror_axes=(0, 1, 2))
    with torch.no_grad():  # one window: the Gaussian weighting divides out
        x = torch.from_numpy(image)[None, None]
        want = mirrored_logits(model, x, (0, 1, 2)).argmax(1)[0].numpy()
    assert (plain != mirrored).any()
    assert np.array_equal(mirrored, want)
    # overlapping windows: still a label map of the volume, the overlap an argument
    half = predict_volume(model, image, (8, 8, 8), cpu, None, mirror_axes=(0, 1, 2), overlap=0.5)
    assert half.shape == image.shape


def test_training_validation_runs_one_pass(tmp_path: Path, tiny_data: Path) -> None:
    """The stage's validation predictor (training/parts.py) calls the model once per window;
    evaluate's mirrored predictor eight times."""
    from orchestrator.training.parts import _data
    from orchestrator.training.predict import inference_model
    from orchestrator.training.step import TrainStep

    plan, _ = quick_tiny_plan(tmp_path / "runs", tiny_data)
    sp = plan.stages[0]
    data = _data(plan, sp, 2, TrainStep.for_stage(sp.spec, "cpu", False), torch.device("cpu"))
    model = models.build_model(sp.spec.model.arch, **sp.model_kwargs()).eval()
    calls: list[int] = []
    model.register_forward_hook(lambda _m, _i, out: calls.append(out.shape[0]))
    vol = data.train_recs[0]
    from orchestrator.data.sources import load_subject

    volume = load_subject(vol)
    data.predict(model, volume)
    one_pass = len(calls)
    ckpt = {"arch": sp.spec.model.arch, "model_kwargs": sp.model_kwargs(),
            "input_size_vox": list(sp.input_size_vox)}
    calls.clear()
    inference_model(tmp_path / "x.pt", ckpt, model, torch.device("cpu"),
                    overlap=0.25).predict(volume)
    assert one_pass >= 1 and len(calls) == 8 * one_pass


def _blob(mask: np.ndarray, corner: tuple[int, int, int], side: int) -> None:
    x, y, z = corner
    mask[x:x + side, y:y + side, z:z + side] = 1


def test_components_keep_largest_and_remove_small() -> None:
    m = np.zeros((20, 20, 20), np.uint8)
    _blob(m, (0, 0, 0), 4)  # 64 voxels
    _blob(m, (10, 10, 10), 2)  # 8 voxels
    assert keep_largest_component(m).sum() == 64
    assert remove_small_components(m, 8).sum() == 72 and remove_small_components(m, 9).sum() == 64
    assert apply_postprocessing(m, None) is m and apply_postprocessing(m, {"method": "none"}) is m
    with pytest.raises(ConfigError, match="post-processing method 'x'; expected one of"):
        apply_postprocessing(m, {"method": "x"})


def test_removing_small_components_is_chosen_only_where_it_raises_dice() -> None:
    truth = np.zeros((24, 24, 24), np.uint8)
    _blob(truth, (2, 2, 2), 6)
    noisy = truth.copy()  # the lesion found, plus three false specks
    for corner in ((15, 15, 15), (20, 2, 20), (2, 20, 12)):
        _blob(noisy, corner, 2)
    helps = choose_postprocessing([noisy, noisy], [truth, truth])
    assert helps["choice"]["method"] in ("remove_small", "keep_largest")
    assert helps["dice_after"] == 1.0 > helps["dice_before"]
    assert helps["lesion_f1_after"] == 1.0 > helps["lesion_f1_before"]
    # small true lesions, found: removing them would lose them; nothing is chosen
    small = truth.copy()
    _blob(small, (15, 15, 15), 2)
    _blob(small, (20, 2, 20), 1)
    hurts = choose_postprocessing([small], [small])
    assert hurts["choice"] == {"method": "none"}
    assert hurts["dice_after"] == hurts["dice_before"] == 1.0
    assert all(c["dice"] < 1.0 for c in hurts["candidates"] if c["method"] != "none")


def _mask(path: Path) -> np.ndarray:
    img: Any = nib.load(path)
    return np.asarray(img.dataobj)


def _run_with_model(tmp_path: Path, tiny_data: Path, foreground: bool) -> Path:
    """runs/tiny: a plan of the tiny data, best.pt of a stage-1-shaped resunet whose head
    labels every voxel lesion (`foreground`) or none, and the stage's split.json."""
    runs = tmp_path / "runs"
    plan, _ = quick_tiny_plan(runs, tiny_data)
    torch.manual_seed(0)
    model = models.build_model("resunet3d", **MODEL_KWARGS)
    state = model.state_dict()
    state["head.conv.weight"].zero_()
    state["head.conv.bias"].copy_(torch.tensor([0.0, 1.0] if foreground else [1.0, 0.0]))
    save_checkpoint(plan.run_dir / "best.pt", {
        "stage": S1, "arch": "resunet3d", "model_kwargs": MODEL_KWARGS,
        "input_size_vox": [32, 32, 32], "model": state, "best_dice": 0.1, "epoch": 2,
        "run_model": {"stage": S1, "epoch": 2, "dice": 0.1}})
    recs = discover_subjects(tiny_data)
    split = {"train": [f"{r.subject}/{r.session}" for r in recs[:3]],
             "val": [f"{r.subject}/{r.session}" for r in recs[3:]]}
    (plan.run_dir / S1).mkdir(parents=True, exist_ok=True)
    (plan.run_dir / S1 / "split.json").write_text(json.dumps(split))
    return plan.run_dir


def test_evaluate_and_predict_run_choose_record_and_apply(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = _run_with_model(tmp_path, tiny_data, foreground=True)
    runs = str(run_dir.parent)
    res = invoke("evaluate", "--run", "tiny", "--runs-dir", runs, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    inf = report["inference"]
    assert inf["mirror_axes"] == [0, 1, 2] and inf["overlap"] == 0.5  # nnU-Net's, by default
    assert inf["seconds_per_volume"]["mirrored"] > 0 and inf["seconds_per_volume"]["single_pass"] > 0
    record = json.loads((run_dir / POSTPROCESS_FILE).read_text())
    # every voxel predicted: one component filling the volume; no removal raises Dice
    assert record["choice"] == {"method": "none"} and record["dice_after"] == record["dice_before"]
    assert record["validation_subjects"] == json.loads((run_dir / S1 / "split.json").read_text())["val"]
    assert record["models"] == [{"file": "best.pt", "stage": S1, "epoch": 2, "dice": 0.1}]
    assert {"lesion_f1_before", "lesion_f1_after", "candidates"} <= set(record)
    assert inf["postprocessing"] == {"method": "none"}
    assert inf["postprocessed"] == inf["mirrored"]
    # a recorded choice for these models is applied as recorded (here: remove everything)
    record["choice"] = {"method": "remove_small", "min_size_vox": 10**6}
    (run_dir / POSTPROCESS_FILE).write_text(json.dumps(record))
    res = invoke("evaluate", "--run", "tiny", "--runs-dir", runs, "--device", "cpu", "--json",
                 "--no-mirror")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["inference"]["mirror_axes"] == [] and report["inference"]["mirrored"]["dice"] is None
    assert report["inference"]["seconds_per_volume"]["mirrored"] is None
    assert report["metrics"]["volume_pred_mm3"]["max"] == 0.0  # removed
    assert report["inference"]["single_pass"]["dice"] < 1.0  # what the model predicted
    image = discover_subjects(tiny_data)[0].image
    res = invoke("predict", "--run", "tiny", "--runs-dir", runs, "--input", str(image),
                 "--out", str(tmp_path / "pp.nii.gz"), "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert not _mask(tmp_path / "pp.nii.gz").any()
    res = invoke("predict", "--checkpoint", str(run_dir / "best.pt"), "--input", str(image),
                 "--out", str(tmp_path / "raw.nii.gz"), "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert _mask(tmp_path / "raw.nii.gz").all()  # no run: no choice
    # a record made for other models is stale: chosen again
    record["models"][0]["epoch"] = 1
    (run_dir / POSTPROCESS_FILE).write_text(json.dumps(record))
    res = invoke("predict", "--run", "tiny", "--runs-dir", runs, "--input", str(image),
                 "--out", str(tmp_path / "again.nii.gz"), "--device", "cpu", "--no-mirror")
    assert res.exit_code == 0, res.stderr
    assert _mask(tmp_path / "again.nii.gz").all()
    assert json.loads((run_dir / POSTPROCESS_FILE).read_text())["choice"] == {"method": "none"}


def test_predict_defaults_mirror_and_bad_overlap_is_one_line(tmp_path: Path, tiny_data: Path) -> None:
    import typer.main

    from orchestrator.cli import app

    for name in ("evaluate", "predict"):
        cmd = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
        params = {p.name: p.default for p in cmd.params}
        assert params["mirror"] is True and params["overlap"] == 0.5, name
    run_dir = _run_with_model(tmp_path, tiny_data, foreground=False)
    image = discover_subjects(tiny_data)[0].image
    res = invoke("predict", "--checkpoint", str(run_dir / "best.pt"), "--input", str(image),
                 "--overlap", "1.5")
    assert res.exit_code == 2 and "--overlap" in res.stderr


def test_predict_run_without_its_data_applies_nothing(tmp_path: Path, tiny_data: Path) -> None:
    """On a machine without the run's data (the plan names a folder that is not there),
    `predict --run` still predicts, with no post-processing, and records no choice."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run_dir = _run_with_model(tmp_path, data, foreground=True)
    image = tmp_path / "new_T1w.nii.gz"
    shutil.copy(discover_subjects(data)[0].image, image)
    shutil.rmtree(data)
    res = invoke("predict", "--run", "tiny", "--runs-dir", str(run_dir.parent), "--input",
                 str(image), "--out", str(tmp_path / "m.nii.gz"), "--device", "cpu", "--no-mirror")
    assert res.exit_code == 0, res.stderr
    assert _mask(tmp_path / "m.nii.gz").all() and not (run_dir / POSTPROCESS_FILE).exists()
