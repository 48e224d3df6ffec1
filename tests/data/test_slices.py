"""Tests for medanomaly.data.slices: normalisation and in-memory slice sets (tiny synthetic folders)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.data import slices
from medanomaly.data.discover import (
    discover,
)
from medanomaly.data.slices import (
    SliceSet,
    fit,
    fit_mask,
    load_slices,
    normalize,
    resize,
    square_padding,
    to_slices,
    unfit,
)
from medanomaly.io import read_image

# ---------------------------------------------------------------- helpers


def _grey(seed: int = 0, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def _mask(size: tuple[int, int] = (8, 8), lesion: bool = True) -> np.ndarray:
    m = np.zeros(size, np.uint8)
    if lesion:
        m[2:5, 3:6] = 255
    return m


def _png(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(array).save(path, format=fmt)
    return path


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path



# ---------------------------------------------------------------- tokens


# ---------------------------------------------------------------- discover: layouts


def _nnunet(root: Path, cases=("c1", "c2"), test_cases=("c3",)) -> None:
    rng = np.random.default_rng(0)
    for c in cases:
        _nifti(root / "imagesTr" / f"{c}_0000.nii.gz", rng.random((4, 4, 3)).astype(np.float32))
        label = np.zeros((4, 4, 3), np.uint8)
        label[1:3, 1:3, 1] = 1
        _nifti(root / "labelsTr" / f"{c}.nii.gz", label)
    for c in test_cases:
        _nifti(root / "imagesTs" / f"{c}_0000.nii.gz", rng.random((4, 4, 3)).astype(np.float32))


# ---------------------------------------------------------------- splits


def _write_splits(path: Path, splits: dict) -> Path:
    path.write_text(json.dumps(splits))
    return path


# ---------------------------------------------------------------- normalize / resize / to_slices


def test_normalize_auto_uint8_range_divides_by_255():
    a = np.array([[[0, 51, 255], [10, 20, 30]]], dtype=np.float32)
    out = normalize(a, "auto", "raster")
    np.testing.assert_allclose(out, a / 255.0, rtol=1e-6)
    assert out.dtype == np.float32


def test_normalize_auto_wide_range_uses_percentile():
    a = np.linspace(0, 4000, 400, dtype=np.float32).reshape(1, 20, 20)
    out = normalize(a, "auto", "raster")
    np.testing.assert_allclose(out, normalize(a, "percentile"))
    assert out.min() == 0.0 and out.max() == 1.0


def test_normalize_percentile_maps_to_unit_interval():
    rng = np.random.default_rng(0)
    a = np.stack([rng.normal(100, 30, (16, 16)), rng.normal(-5, 1, (16, 16))]).astype(np.float32)
    out = normalize(a, "percentile")
    assert out.shape == a.shape and out.dtype == np.float32
    for c in range(2):  # per channel
        assert out[c].min() == 0.0 and out[c].max() == 1.0
    assert normalize(np.full((1, 4, 4), 7.0, np.float32), "percentile").max() == 0.0  # constant image


def test_normalize_ct_window():
    a = np.array([[[-2000, -1000, 0, 500, 1000, 3000]]], dtype=np.float32)
    expected = np.array([[[0, 0, 0.5, 0.75, 1, 1]]], dtype=np.float32)
    np.testing.assert_allclose(normalize(a, "ct"), expected)
    np.testing.assert_allclose(normalize(a, "auto", "dicom"), expected)  # dicom with negative HU


def test_normalize_none_is_a_copy():
    a = np.array([[[1.5, -3.0]]], dtype=np.float32)
    out = normalize(a, "none")
    np.testing.assert_array_equal(out, a)
    assert out is not a


def test_normalize_unknown_mode():
    with pytest.raises(MedanomalyError, match="zscore"):
        normalize(np.zeros((1, 2, 2), np.float32), "zscore")


@pytest.mark.parametrize("mode", ["auto", "percentile", "ct", "none"])
def test_normalize_does_not_modify_input(mode):
    a = np.random.default_rng(1).normal(0, 500, (2, 6, 6)).astype(np.float32)
    ref = a.copy()
    normalize(a, mode, "dicom")
    np.testing.assert_array_equal(a, ref)


def test_to_slices_2d_and_3d(tmp_path):
    img2 = read_image(_png(tmp_path / "a.png", _grey()))
    assert to_slices(img2).shape == (1, 1, 8, 8)
    vol = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)  # (X, Y, Z)
    img3 = read_image(_nifti(tmp_path / "v.nii.gz", vol))
    s = to_slices(img3)
    assert s.shape == (3, 1, 5, 4)
    np.testing.assert_allclose(s[1, 0], vol[:, :, 1].T)


def test_resize_shapes():
    x = torch.rand(2, 3, 8, 8)
    assert resize(x, (8, 8)) is x
    assert resize(x, (16, 12)).shape == (2, 3, 16, 12)
    assert resize(x, (4, 4), mode="nearest").shape == (2, 3, 4, 4)


# ---------------------------------------------------------------- load_slices


def _sibling_folder(root: Path, n: int = 3) -> list:
    for i in range(n):
        _png(root / f"s{i}.png", _grey(i))
        _png(root / f"s{i}_mask.png", _mask(lesion=i % 2 == 0))
    return discover(root)


def test_load_slices_2d(tmp_path):
    samples = _sibling_folder(tmp_path)
    ss = load_slices(samples, size=16)
    assert isinstance(ss, SliceSet) and len(ss) == 3
    assert ss.images.shape == (3, 1, 16, 16) and ss.images.dtype == torch.float16
    assert ss.masks.shape == (3, 1, 16, 16) and ss.masks.dtype == torch.uint8
    assert set(torch.unique(ss.masks).tolist()) == {0, 1}
    assert ss.masks[1].sum() == 0 and ss.masks[0].sum() > 0
    assert 0.0 <= ss.images.min() and ss.images.max() <= 1.0
    assert ss.cases == ["s0", "s1", "s2"]
    assert ss.sources == [s.image for s in samples]


def test_load_slices_volumes_one_slice_per_z(tmp_path):
    _nnunet(tmp_path, test_cases=())
    ss = load_slices(discover(tmp_path), size=16)
    assert ss.images.shape == (6, 1, 16, 16)
    assert ss.masks.shape == (6, 1, 16, 16)
    assert ss.cases == ["c1"] * 3 + ["c2"] * 3
    assert [int(m.sum() > 0) for m in ss.masks[:3]] == [0, 1, 0]  # lesion on z=1 only
    assert set(torch.unique(ss.masks).tolist()) <= {0, 1}


def test_load_slices_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _png(tmp_path / "c.png", rgb)
    _png(tmp_path / "c_mask.png", _mask())
    ss = load_slices(discover(tmp_path), size=16)
    assert ss.images.shape == (1, 3, 16, 16)


def test_load_slices_without_masks(tmp_path):
    _png(tmp_path / "a.png", _grey())
    ss = load_slices(discover(tmp_path), size=16, with_masks=False)
    assert ss.masks is None and ss.images.shape == (1, 1, 16, 16)


def test_load_slices_wrong_mask_size(tmp_path):
    _png(tmp_path / "a.png", _grey())
    _png(tmp_path / "a_mask.png", _mask(size=(6, 6)))
    with pytest.raises(MedanomalyError, match="does not match"):
        load_slices(discover(tmp_path), size=16)


def test_load_slices_missing_mask(tmp_path):
    _png(tmp_path / "a.png", _grey())
    _png(tmp_path / "a_mask.png", _mask())
    _png(tmp_path / "b.png", _grey())
    with pytest.raises(MedanomalyError) as info:
        load_slices(discover(tmp_path), size=16)
    assert "b.png" in str(info.value)


def test_load_slices_channel_mismatch_names_file(tmp_path):
    _sibling_folder(tmp_path, n=2)
    _png(tmp_path / "s9.png", np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(tmp_path / "s9_mask.png", _mask())
    with pytest.raises(MedanomalyError) as info:
        load_slices(discover(tmp_path), size=16)
    assert "s9.png" in str(info.value) and "channels" in str(info.value)


# ---------------------------------------------------------------- real data




def test_square_padding_by_hand():
    assert square_padding(256, 256) == (0, 0, 0, 0)
    assert square_padding(40, 50) == (5, 5, 0, 0)  # rows added above and below
    assert square_padding(5, 2) == (0, 0, 1, 2)  # the odd pixel on the right
    assert square_padding(10, 20, (2.0, 1.0)) == (0, 0, 0, 0)  # 20 mm x 20 mm already
    assert square_padding(10, 10, (2.0, 1.0)) == (0, 0, 5, 5)  # 20 mm x 10 mm: 10 more columns


def test_fit_keeps_square_inputs_as_resize_and_unfit_inverts_shape():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fit(x, 8), resize(x, (8, 8)))  # square, square pixels: today's numbers
    y = torch.rand(2, 1, 8, 8)
    assert torch.equal(unfit(y, (16, 16)), F.interpolate(y, size=(16, 16), mode="bilinear", align_corners=False))
    wide = torch.ones(1, 1, 4, 8)
    fitted = fit(wide, 8, mode="nearest")
    assert fitted[0, 0, :2].sum() == 0 and fitted[0, 0, 6:].sum() == 0 and fitted[0, 0, 2:6].min() == 1  # padded, not squashed
    assert unfit(fitted, (4, 8)).shape == (1, 1, 4, 8) and unfit(fitted, (4, 8)).min() == 1


def test_normalize_per_channel_by_modality():
    """auto: a channel named CT is windowed (-1000..1000 HU), the MR channel beside it percentile-scaled;
    without names the one-channel result is as before (percentile for a NIfTI)."""
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1000, (16, 16)).astype(np.float32)
    mr = rng.uniform(0, 500, (16, 16)).astype(np.float32)
    out = normalize(np.stack([ct, mr]), "auto", "nifti", None, ("CT", "T2"))
    assert np.allclose(out[0], np.clip((ct + 1000) / 2000, 0, 1))
    assert np.array_equal(out[1], normalize(mr[None], "auto", "nifti")[0])
    assert np.array_equal(normalize(ct[None], "auto", "nifti"), normalize(ct[None], "percentile", "nifti"))
    assert not np.allclose(normalize(mr[None], "auto", "nifti", None, ("contrast",)), (mr[None] + 1000) / 2000)
    rgb = rng.integers(0, 256, (3, 8, 8)).astype(np.float32)  # 8-bit rasters: / 255 whatever the names
    assert np.array_equal(normalize(rgb, "auto", "raster", "uint8", ("R", "G", "B")), rgb / 255)


def test_masks_of_several_labels_are_kept_as_class_indices(tmp_path, multilabel_phantoms):
    data = multilabel_phantoms(tmp_path / "data")
    samples = [s for s in discover(data) if s.case == "case0"]
    binary = load_slices(samples, 32)
    labelled = load_slices(samples, 32, labels=[1, 2])
    assert labelled.masks.dtype == torch.uint8 and set(labelled.masks.unique().tolist()) == {0, 1, 2}
    torch.testing.assert_close((labelled.masks > 0).to(torch.uint8), binary.masks)  # the same lesions, split by label
    assert bool(labelled.lesion.all()) and torch.equal(labelled.images, binary.images)
    assert torch.equal(load_slices(samples, 32, labels=[1, 2, 5]).masks, labelled.masks)  # a label no mask holds
    with pytest.raises(MedanomalyError, match=r"mask .*case0_0_mask\.png holds the value 1, which none of the labels "
                                              r"\(2, 5\) names"):
        load_slices(samples, 32, labels=[2, 5])


def test_fitting_a_label_map_keeps_every_label_and_never_mixes_them():
    mt = torch.zeros((1, 1, 20, 30))
    mt[0, 0, 2:8, 2:8], mt[0, 0, 10:18, 20:28] = 1, 2  # a non-square slice: padded, then resized
    out = fit_mask(mt, 16, (1.0, 1.0), classes=2)
    assert set(out.unique().tolist()) == {0, 1, 2}
    torch.testing.assert_close((out > 0).to(torch.uint8), fit_mask((mt > 0).float(), 16, (1.0, 1.0)), atol=0, rtol=0)


def test_masks_of_several_values_without_labels_train_as_one_lesion_and_say_how_to_split(tmp_path,
                                                                                        multilabel_phantoms,
                                                                                        caplog, monkeypatch):
    data = multilabel_phantoms(tmp_path / "data", dataset_json=False)
    monkeypatch.setattr(slices, "_NOTED", set())
    with caplog.at_level(logging.INFO, logger="medanomaly.data.slices"):
        sl = load_slices(discover(data), 32)
        load_slices(discover(data), 32)
    assert set(sl.masks.unique().tolist()) == {0, 1}
    notes = [r.getMessage() for r in caplog.records if "several label values" in r.getMessage()]
    assert len(notes) == 1 and "--labels 1=NAME,2=NAME" in notes[0]
