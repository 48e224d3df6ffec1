"""Tests for medanomaly.data.volumes: the patch sampler, resampling, slices stacked into volumes, and
end-to-end 3D runs on the real volumes of ../shared/data (skipped without it). Sliding-window
inference: tests/infer/test_sliding.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medanomaly.apps.cli import main
from medanomaly.data.discover import discover
from medanomaly.data.volumes import (
    Volume,
    VolumeCase,
    crop,
    default_patch,
    group_volumes,
    load_volume,
    read_volume,
    read_volume_mask,
    resample,
    resample_mask,
    resampled_shape,
    sample_patches,
    training_geometry,
    volume_spacing,
)
from medanomaly.infer.predictor import Predictor
from medanomaly.io import read_image

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
VOLUMES, IXI, LGG = DATA / "volumes", DATA / "volumes" / "ixi-t1-healthy", DATA / "lgg-flair"
needs = {"volumes": pytest.mark.shared_data("volumes/brain1_image.nrrd"),
         "ixi": pytest.mark.shared_data("volumes/ixi-t1-healthy"), "lgg": pytest.mark.shared_data("lgg-flair")}


def _volume(shape=(32, 64, 64), lesion=((2, 4), (50, 52), (5, 7))) -> Volume:
    img = torch.rand((1,) + shape)
    mask = torch.zeros(shape, dtype=torch.uint8)
    mask[tuple(slice(a, b) for a, b in lesion)] = 1
    return Volume("a", img, mask, torch.nonzero(mask), True)


# ---- patch sampler ------------------------------------------------------------------------------

def test_patches_have_the_patch_shape_and_are_reproducible():
    vols = [_volume(), _volume((20, 40, 48))]
    a = sample_patches(vols, 6, (8, 16, 24), 0.5, torch.Generator().manual_seed(3))
    b = sample_patches(vols, 6, (8, 16, 24), 0.5, torch.Generator().manual_seed(3))
    assert a[0].shape == (6, 1, 8, 16, 24) and a[1].shape == (6, 1, 8, 16, 24) and a[2].shape == (6,)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = sample_patches(vols, 6, (8, 16, 24), 0.5, torch.Generator().manual_seed(4))
    assert not torch.equal(a[0], c[0])


def test_foreground_fraction_is_respected():
    vol, n, patch = _volume(), 600, (8, 16, 16)
    for p in (0.0, 0.33, 1.0):
        x, y, forced = sample_patches([vol], n, patch, p, torch.Generator().manual_seed(0))
        hit = y.flatten(1).amax(1) > 0
        assert abs(float(forced.float().mean()) - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9
        assert bool(hit[forced].all())  # a forced patch always holds its lesion voxel
        assert float(hit.float().mean()) >= float(forced.float().mean())
        if p == 0.0:
            assert float(hit.float().mean()) < 0.1  # the lesion is a corner cube: rarely hit by chance


def test_small_volumes_are_zero_padded():
    vol = Volume("s", torch.full((1, 3, 10, 12), 7.0), torch.ones((3, 10, 12), dtype=torch.uint8),
                 torch.zeros((0, 3), dtype=torch.long), False)
    x, y, forced = sample_patches([vol], 5, (8, 16, 16), 0.33, torch.Generator().manual_seed(1))
    assert x.shape == (5, 1, 8, 16, 16) and not forced.any()  # no centres: never forced
    assert torch.all((x == 0) | (x == 7)) and int((x == 7).sum(dim=(1, 2, 3, 4)).min()) == 3 * 10 * 12
    assert torch.equal(y.bool(), x[:, :1] == 7)
    assert torch.equal(crop(vol.image, (0, 0, 0), (3, 10, 12)), vol.image)


# ---- resampling ---------------------------------------------------------------------------------

def test_resampling_round_trip():
    assert resampled_shape((25, 256, 256), (6.5, 0.78, 0.78), (6.5, 1.56, 1.56)) == (25, 128, 128)
    assert resampled_shape((25, 256, 256), (6.5, 0.78, 0.78), None) == (25, 256, 256)
    z, y, x = np.meshgrid(np.arange(12.0), np.arange(40.0), np.arange(36.0), indexing="ij")
    field = (0.3 * z + 0.1 * y - 0.05 * x)[None].astype(np.float32)
    before = field.copy()
    back = resample(resample(field, (12, 20, 18)), (12, 40, 36)).numpy()
    np.testing.assert_array_equal(field, before)  # input not modified
    assert back.shape == field.shape
    np.testing.assert_allclose(back[:, :, 2:-2, 2:-2], field[:, :, 2:-2, 2:-2], atol=1e-4)  # linear: exact inside
    mask = np.zeros((12, 40, 36), bool)
    mask[3:9, 10:30, 8:28] = True
    rt = resample_mask(resample_mask(mask, (12, 20, 18)), mask.shape).numpy()
    assert rt.dtype == bool and 2 * (rt & mask).sum() / (rt.sum() + mask.sum()) > 0.9


def test_default_patch_fits_the_budget_and_shrinks_the_longest_axis_in_mm():
    p = default_patch((25, 256, 256), (6.5, 0.78, 0.78), depth=4, max_voxels=2**18)
    assert p == (16, 128, 128)
    assert default_patch((45, 60, 60), (4.0, 4.0, 4.0), depth=2, max_voxels=2**18) == (48, 60, 60)


# ---- real data ----------------------------------------------------------------------------------

@needs["lgg"]
def test_a_folder_of_slices_is_one_volume_in_slice_order(tmp_path):
    """A case's slices in one folder (case id = the folder below the data root) stack, in slice order."""
    patient = sorted(p for p in LGG.iterdir() if p.is_dir())[0]
    (tmp_path / patient.name).symlink_to(patient)
    samples = discover(tmp_path)
    cases = group_volumes(samples)
    assert len(cases) == 1 and len(cases[0].images) == len(samples)
    numbers = [int(p.name.split("_")[-2]) for p in cases[0].images]
    assert numbers == list(range(1, len(numbers) + 1))
    image, slices = read_volume(cases[0])
    mask = read_volume_mask(cases[0], image, slices)
    assert image.array.shape == (1, len(numbers), 256, 256) and mask.shape == (len(numbers), 256, 256)
    assert image.geometry.meta["dtype"] == "uint8" and not image.geometry.spacing_known


def _run(*argv: str) -> None:
    assert main(["-q", *argv]) == 0


@needs["volumes"]
def test_train_predict_evaluate_3d_on_the_labelled_nrrd_volumes_keeps_the_geometry(tmp_path):
    """train=[brain1], val=[brain2]: a split file may not list a case twice, so the evaluation runs
    on the val case (the only other labelled volume)."""
    import SimpleITK as sitk

    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["brain1"], "val": ["brain2"], "test": []}))
    model, pred, ev = tmp_path / "model", tmp_path / "pred", tmp_path / "eval"
    _run("train", str(VOLUMES), "--splits", str(splits), "--out", str(model), "--dim", "3", "--no-plan",
         "--epochs", "1", "--patches-per-epoch", "4", "--patch", "16", "32", "32", "--spacing", "6.5", "3.125",
         "3.125", "--width", "4", "--depth", "2", "--norm", "instance", "--device", "cpu")
    meta = json.loads((model / "model.json").read_text())
    assert meta["input"]["dim"] == 3 and meta["input"]["patch"] == [16, 32, 32]
    assert meta["input"]["spacing"] == [6.5, 3.125, 3.125] and meta["model"]["dim"] == 3
    src_path = VOLUMES / "brain2_image.nrrd"
    _run("predict", str(model), str(src_path), "--out", str(pred))
    src = sitk.ReadImage(str(src_path))
    for kind in ("pred", "score"):
        out = sitk.ReadImage(str(pred / f"brain2_image_{kind}.nrrd"))
        assert out.GetSize() == src.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), src.GetSpacing())
        np.testing.assert_allclose(out.GetOrigin(), src.GetOrigin())
        np.testing.assert_allclose(out.GetDirection(), src.GetDirection())
    score = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "brain2_image_score.nrrd")))
    assert np.isfinite(score).all() and 0 <= score.min() and score.max() <= 1
    _run("evaluate", "--model", str(model), "--data", str(VOLUMES), "--split", "val", "--out", str(ev))
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["n_cases"] == 1 and 0 <= summary["dice"] <= 1 and summary["split"] == "val"
    assert (ev / "predictions" / "brain2_image_pred.nrrd").is_file()
    _check_onnx_3d(model, src_path, tmp_path)


def _check_onnx_3d(model: Path, volume: Path, tmp_path: Path) -> None:
    """Export the 3D network to ONNX (NCDHW patches); ONNX Runtime's sliding-window scores equal
    PyTorch's in fp32, and `predict --runtime onnx` writes the volume in its geometry."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import SimpleITK as sitk

    _run("export", str(model))
    doc = json.loads((model / "model.onnx.json").read_text())
    assert doc["input"]["shape"] == ["N", 1, 16, 32, 32] and doc["input"]["layout"].startswith("NCDHW")
    assert "sliding windows" in doc["input"]["resize"] and doc["output"]["shape"] == ["N", 1, 16, 32, 32]
    image = read_image(volume)
    torch_pred = Predictor(model)
    torch_pred.precision = "fp32"
    np.testing.assert_allclose(Predictor(model, runtime="onnx").scores(image), torch_pred.scores(image), atol=1e-4)
    _run("predict", str(model), str(volume), "--out", str(tmp_path / "onnx"), "--runtime", "onnx")
    out = sitk.ReadImage(str(tmp_path / "onnx" / "brain2_image_pred.nrrd"))
    assert out.GetSize() == sitk.ReadImage(str(volume)).GetSize()


@needs["ixi"]
def test_anomaly_3d_on_healthy_ixi_volumes_keeps_the_affine(tmp_path):
    import nibabel as nib

    data = tmp_path / "ixi"
    data.mkdir()
    vols = sorted(IXI.glob("*.nii.gz"))[:3]
    for v in vols:
        (data / v.name).symlink_to(v)
    keys = [v.name[: -len(".nii.gz")] for v in vols]
    (data / "splits.json").write_text(json.dumps({"train": keys[:1], "val": keys[1:2], "test": keys[2:]}))
    model = tmp_path / "model"
    _run("train", str(data), "--out", str(model), "--task", "anomaly", "--dim", "3", "--no-plan", "--epochs", "1",
         "--patches-per-epoch", "4", "--patch", "16", "32", "32", "--spacing", "4", "4", "4", "--width", "4",
         "--depth", "2", "--norm", "instance", "--device", "cpu")
    meta = json.loads((model / "model.json").read_text())
    assert meta["input"]["dim"] == 3 and meta["calibration"]["mode"].startswith("target_fpr")
    _run("predict", str(model), str(vols[2]), "--out", str(tmp_path / "pred"))
    src = nib.load(vols[2])
    for kind in ("pred", "score"):
        out = nib.load(tmp_path / "pred" / f"{keys[2]}_{kind}.nii.gz")
        assert out.shape == src.shape[:3]
        np.testing.assert_array_equal(out.affine, src.affine)
    score = nib.load(tmp_path / "pred" / f"{keys[2]}_score.nii.gz").get_fdata()
    assert np.isfinite(score).all() and score.max() > 0


def test_volumes_are_loaded_in_the_canonical_orientation_with_their_masks(tmp_path):
    """A NIfTI stored RAS (x to the right): loaded with x and y reversed (L, P, S), mask alike;
    the geometry record gives the canonical spacing and the acquisition plane."""
    img = np.zeros((8, 6, 4), np.float32)
    img[0, 0, 0] = 100.0  # the left-most, posterior-most, lowest voxel (x grows to the right)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image((img > 0).astype(np.uint8), affine), tmp_path / "a_mask.nii.gz")
    vc = VolumeCase("a", (tmp_path / "a.nii.gz",), (tmp_path / "a_mask.nii.gz",))
    v = load_volume(vc, None, "none", "supervised")
    assert tuple(v.image.shape) == (1, 4, 6, 8) and float(v.image[0, 0, 5, 7]) == 100.0  # x and y reversed
    assert torch.equal(torch.nonzero(v.mask), torch.tensor([[0, 5, 7]]))
    assert volume_spacing(vc) == (3.0, 2.0, 1.0)
    record = training_geometry(discover(tmp_path))
    assert record == {"orientation": ["L", "P", "S"], "median_spacing": [3.0, 2.0, 1.0], "slice_plane": "axial"}
