"""orchestrator.data.slices: slice stacks, the LCNN training dataset and slice-wise inference."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.data.records import SubjectRecord
from orchestrator.data.slices import SliceStackDataset, predict_volume_slices, slice_stack
from orchestrator.data.synth import synthesize_atlas
from orchestrator.errors import ConfigError

SHAPE_VOX = (32, 40, 24)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[SubjectRecord]:
    root = tmp_path_factory.mktemp("atlas")
    return synthesize_atlas(root, subjects=2, shape_vox=SHAPE_VOX, seed=0)


def _dataset(records, **kwargs) -> SliceStackDataset:
    args = {"in_slices": 3, "size_hw": (32, 32), "samples_per_epoch": 6, "seed": 0}
    return SliceStackDataset(records, **{**args, **kwargs})


# --- slice_stack -------------------------------------------------------------------------

def test_slice_stack_transposes_to_y_x_and_replicates_edges():
    image = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # image[x, y, z] = 12x + 4y + z
    stack = slice_stack(image, 0, 1)
    assert stack.shape == (3, 3, 2)  # (2T+1, H=Y, W=X)
    z0 = [[0, 12], [4, 16], [8, 20]]
    z1 = [[1, 13], [5, 17], [9, 21]]
    np.testing.assert_array_equal(stack, [z0, z0, z1])  # slice -1 clamps to 0
    top = slice_stack(image, 3, 2)
    assert [int(plane[0, 0]) for plane in top] == [1, 2, 3, 3, 3]
    assert slice_stack(image, 2, 0).shape == (1, 3, 2)


# --- SliceStackDataset -------------------------------------------------------------------

def test_dataset_items_have_stack_shapes_and_dtypes(records):
    ds = _dataset(records, in_slices=5, size_hw=(32, 48))
    item = ds[0]
    assert len(ds) == 6
    assert item["image"].shape == (5, 32, 48) and item["image"].dtype == torch.float32
    assert item["label"].shape == (32, 48) and item["label"].dtype == torch.int64
    assert set(item["label"].unique().tolist()) <= {0, 1}


def test_dataset_is_a_pure_function_of_seed_epoch_and_index(records):
    first = _dataset(records, augment=True)
    second = _dataset(records, augment=True)
    second[5]  # a different access order and cache state must not matter
    first.set_epoch(1)
    second.set_epoch(1)
    for i in (0, 5):
        for key in ("image", "label"):
            assert torch.equal(first[i][key], second[i][key])
    second.set_epoch(2)
    assert any(not torch.equal(first[i]["image"], second[i]["image"]) for i in range(6))


def test_lesion_fraction_one_centres_every_stack_on_lesion(records):
    ds = _dataset(records, lesion_fraction=1.0)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert all(ds[i]["label"].sum() > 0 for i in range(len(ds)))


def _write_halves(tmp_path: Path, shape_vox=(34, 20, 5)) -> SubjectRecord:
    """A volume whose left half is 100 and right half 200, inside a 1-voxel zero border in X."""
    data = np.zeros(shape_vox, dtype=np.float32)
    mid = shape_vox[0] // 2
    data[1:mid] = 100.0
    data[mid:-1] = 200.0
    image, mask = tmp_path / "sub-h_T1w.nii.gz", tmp_path / "sub-h_mask.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), image)
    nib.save(nib.Nifti1Image(np.zeros(shape_vox, dtype=np.uint8), np.eye(4)), mask)
    return SubjectRecord("sub-h", "", image, mask)


@pytest.mark.parametrize("size_hw", [(16, 30), (16, 31), (25, 40), (25, 41)])
def test_crop_and_pad_keep_the_midline_in_the_middle_of_w(tmp_path, size_hw):
    ds = _dataset([_write_halves(tmp_path)], in_slices=1, size_hw=size_hw)
    row = ds[0]["image"][0, size_hw[0] // 2].numpy()  # z-scored: left -1, right +1
    width = size_hw[1]
    boundary = int(np.flatnonzero(row > 0)[0])
    assert (row[:boundary] <= 0).all() and (row[boundary:][row[boundary:] != 0] > 0).all()
    if (34 - width) % 2 == 0:
        assert boundary == width / 2
        np.testing.assert_array_equal(row[::-1], -row)  # mirror image about the middle
    else:
        assert abs(boundary - width / 2) == 0.5  # the odd voxel: half a voxel off, no more


# --- predict_volume_slices ---------------------------------------------------------------

class CentreSign(nn.Module):
    """Logits favouring class 1 where the centre slice is > 0, class 0 elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        return torch.cat([torch.zeros_like(centre), torch.where(centre > 0, 1.0, -1.0)], dim=1)


@pytest.mark.parametrize(
    ("size_hw", "kept_y", "kept_x"),
    [
        ((32, 32), slice(None), slice(None)),  # pad both
        ((16, 12), slice(4, 20), slice(4, 16)),  # crop both
        ((21, 27), slice(1, 22), slice(None)),  # odd crop of Y, odd pad of X
    ],
)
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_predict_volume_slices_maps_back_to_volume_geometry(size_hw, kept_y, kept_x, amp_dtype):
    rng = np.random.default_rng(0)
    image = np.full((20, 24, 7), -1.0, dtype=np.float32)  # (X, Y, Z)
    inside = rng.standard_normal(image.shape).astype(np.float32)
    image[kept_x, kept_y] = inside[kept_x, kept_y]  # positive voxels only where not cropped
    model = CentreSign().train()
    pred = predict_volume_slices(
        model, image, 3, size_hw, torch.device("cpu"), amp_dtype, batch_size=3
    )
    assert pred.dtype == np.uint8 and pred.shape == image.shape
    np.testing.assert_array_equal(pred, (image > 0).astype(np.uint8))
    assert model.training  # mode restored


# --- errors ------------------------------------------------------------------------------

def test_even_or_zero_in_slices_and_bad_size_are_config_errors():
    rec = [SubjectRecord("sub-x", "", Path("x_T1w.nii.gz"), Path("x_mask.nii.gz"))]
    with pytest.raises(ConfigError, match="in_slices 4; expected an odd count"):
        SliceStackDataset(rec, in_slices=4, size_hw=(32, 32), samples_per_epoch=1)
    with pytest.raises(ConfigError, match="in_slices 0; expected an odd count"):
        SliceStackDataset(rec, in_slices=0, size_hw=(32, 32), samples_per_epoch=1)
    with pytest.raises(ConfigError, match=r"size_hw \(0, 32\); expected 2 positive sizes"):
        SliceStackDataset(rec, in_slices=3, size_hw=(0, 32), samples_per_epoch=1)
    with pytest.raises(ConfigError, match="in_slices 2"):
        predict_volume_slices(
            CentreSign(), np.zeros((4, 4, 4)), 2, (4, 4), torch.device("cpu"), None
        )
