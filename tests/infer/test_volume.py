"""Tests for medanomaly.infer.volume: samples grouped into volumes (a folder of 2D slices stacks into
one, a 3D file is one of its own) with their masks, and a volume prediction cut back into one
prediction per slice. Tiny hand-made phantoms and NIfTI volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from medanomaly.data.discover import discover
from medanomaly.infer.predictor import Prediction
from medanomaly.infer.volume import iter_volumes, slice_predictions
from medanomaly.io import read_image, read_mask


def test_a_folder_of_slices_is_one_stacked_volume_with_its_mask(tmp_path, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")  # 4 cases x 3 slices of 32 x 32, each with a mask
    volumes = list(iter_volumes(discover(data)))
    assert [vc.case for vc, *_ in volumes] == ["case0", "case1", "case2", "case3"]
    vc, image, slices, mask = volumes[1]
    assert image.array.shape == (1, 3, 32, 32) and mask.shape == (3, 32, 32) and mask.dtype == bool
    assert [s.path for s in slices] == list(vc.images) and len(vc.images) == 3
    for k, path in enumerate(vc.images):
        np.testing.assert_array_equal(image.array[:, k], read_image(path).array)
        np.testing.assert_array_equal(mask[k], read_mask(vc.masks[k]))


def test_a_3d_file_is_a_volume_without_slices_and_a_missing_mask_is_empty(tmp_path):
    xyz = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(xyz, np.eye(4)), tmp_path / f"{name}.nii.gz")
    label = np.zeros((6, 5, 4), np.uint8)
    label[1:3, 2, 0] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "a_mask.nii.gz")
    volumes = {vc.images[0].name: (image, slices, mask) for vc, image, slices, mask in iter_volumes(discover(tmp_path))}
    assert set(volumes) == {"a.nii.gz", "b.nii.gz"}
    image, slices, mask = volumes["a.nii.gz"]
    assert slices is None and image.array.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(mask, label.transpose(2, 1, 0) > 0)
    _, slices, empty = volumes["b.nii.gz"]
    assert slices is None and empty.shape == (4, 5, 6) and not empty.any()


def test_slice_predictions_give_each_slice_its_own_image(tmp_path, labelled_phantoms):
    data = labelled_phantoms(tmp_path / "data")
    vc, image, slices, _ = next(iter_volumes(discover(data)))
    score = np.random.default_rng(1).random(image.spatial_shape).astype(np.float32)
    parts = slice_predictions(Prediction(image, score, score > 0.5), slices)
    assert len(parts) == 3
    for k, part in enumerate(parts):
        assert part.image is slices[k] and part.image.path == vc.images[k]
        np.testing.assert_array_equal(part.score, score[k])
        np.testing.assert_array_equal(part.mask, score[k] > 0.5)
