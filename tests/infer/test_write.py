"""Tests for medanomaly.infer.write: which files below predict's inputs are images, where each one's
outputs go (one name per input, never inside an input), what is refused before any work, and the
files and regions record written for one 2D or 3D prediction."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from medanomaly.config.labels import Label
from medanomaly.core.errors import MedanomalyError
from medanomaly.infer.overlay import overlay_rgb
from medanomaly.infer.predictor import Prediction
from medanomaly.infer.write import (
    LABEL_RGB,
    check_output_dir,
    check_outputs,
    iter_inputs,
    nnunet_case,
    output_stem,
    output_stems,
    prediction_files,
    score_file,
    write_prediction,
)
from medanomaly.io import read_image
from medanomaly.io.dicomseg_labels import read_dicom_seg_labels


def _png(path: Path, value: int = 100, size: tuple[int, int] = (8, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_inputs_are_the_images_below_without_masks_outputs_or_hidden_files(tmp_path):
    root = tmp_path / "in"
    a, b = _png(root / "a.png"), _png(root / "sub" / "b.png")
    for skipped in ("a_mask.png", "a_pred.png", "a_overlay.png", ".hidden/c.png", "sub/b_score.png"):
        _png(root / skipped)
    (root / "notes.txt").write_text("not an image")
    assert list(iter_inputs([root])) == [(root, a), (root, b)]
    assert list(iter_inputs([b])) == [(b.parent, b)]  # a file: its own folder is the root
    assert list(iter_inputs([b, root])) == [(b.parent, b), (root, a)]  # an image reached twice: predicted once
    with pytest.raises(MedanomalyError, match="does not exist"):
        list(iter_inputs([tmp_path / "absent"]))


def test_outputs_keep_the_path_below_the_root_and_get_one_name_each(tmp_path):
    out = tmp_path / "out"
    assert output_stem(out, tmp_path / "in", tmp_path / "in" / "sub" / "scan.nii.gz") == out / "sub" / "scan"
    one, two = _png(tmp_path / "x" / "scan.png"), _png(tmp_path / "y" / "scan.png")  # same rel/stem: "scan"
    stems = output_stems(out, [(one.parent, one), (two.parent, two)])
    assert set(stems) == {one, two} and stems[one] != stems[two]
    assert all(out in s.parents for s in stems.values())


def test_an_output_folder_inside_an_input_is_refused(tmp_path):
    _png(tmp_path / "in" / "a.png")
    for inside in (tmp_path / "in", tmp_path / "in" / "results"):
        with pytest.raises(MedanomalyError):
            check_output_dir(inside, [tmp_path / "in"])
    with pytest.raises(MedanomalyError):  # a file input: its folder is the input's tree
        check_output_dir(tmp_path / "in" / "results", [tmp_path / "in" / "a.png"])
    check_output_dir(tmp_path / "out", [tmp_path / "in"])  # beside it: fine


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    out, stem = tmp_path / "out", tmp_path / "out" / "scan"
    check_outputs(out, [stem], overwrite=False, extra=("regions.json",))  # nothing there yet
    _png(out / "scan_pred.png")
    with pytest.raises(MedanomalyError, match="scan_pred.png"):
        check_outputs(out, [stem], overwrite=False)
    check_outputs(out, [stem], overwrite=True)
    (out / "regions.json").write_text("{}")
    with pytest.raises(MedanomalyError, match="regions.json"):
        check_outputs(out, [tmp_path / "out" / "other"], overwrite=False, extra=("regions.json",))


def test_a_2d_prediction_writes_mask_score_and_overlay_in_the_inputs_format(tmp_path):
    image = read_image(_png(tmp_path / "scan.png", size=(6, 7)))
    score = np.zeros((6, 7), np.float32)
    score[1:3, 2:5] = 0.9  # one 2 x 3 region
    record = write_prediction(Prediction(image, score, score > 0.5), tmp_path / "out" / "scan")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan_overlay.png", "scan_pred.png",
                                                                    "scan_score.tif"]
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "out" / "scan_pred.png")), (score > 0.5) * 255)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "scan_score.tif"), score)
    assert np.asarray(PILImage.open(tmp_path / "out" / "scan_overlay.png")).shape == (6, 7, 3)
    (region,) = record["regions"]
    assert region["area_px"] == 6 and region["area_mm"] is None and region["bbox"] == [1, 2, 3, 5]
    assert "dicom_seg" not in record


def test_a_volume_prediction_keeps_the_geometry_and_overlays_its_best_slice(tmp_path):
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((7, 6, 4)).astype(np.float32), affine),
             tmp_path / "vol.nii.gz")
    image = read_image(tmp_path / "vol.nii.gz")  # (1, 4, 6, 7)
    score = np.zeros((4, 6, 7), np.float32)
    score[2, 1:4, 1:3] = 0.8  # the slice with the largest predicted area: 2
    record = write_prediction(Prediction(image, score, score > 0.5), tmp_path / "vol")
    back = nib.load(tmp_path / "vol_pred.nii.gz")
    np.testing.assert_array_equal(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), (score > 0.5).transpose(2, 1, 0))
    shown = overlay_rgb(image.array[:, 2], score[2], score[2] > 0.5)
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "vol_overlay.png")), shown)
    (region,) = record["regions"]
    assert region["area_px"] == 6 and region["area_mm"] == pytest.approx(6 * 2.0 * 0.5 * 0.5)


def test_a_csv_listing_is_an_input_named_below_the_folder_of_its_images(tmp_path):
    a, b = _png(tmp_path / "scans" / "p1" / "a.png"), _png(tmp_path / "scans" / "p2" / "b.png")
    listing = tmp_path / "lists" / "todo.csv"
    listing.parent.mkdir()
    listing.write_text("image,mask\n../scans/p1/a.png,\n../scans/p2/b.png,\n")
    items = list(iter_inputs([listing]))
    assert items == [(tmp_path / "scans", a), (tmp_path / "scans", b)]
    assert list(output_stems(tmp_path / "out", items).values()) == [tmp_path / "out/p1/a", tmp_path / "out/p2/b"]
    with pytest.raises(MedanomalyError, match="inside the input"):  # --out inside the listed images' tree
        check_output_dir(tmp_path / "scans" / "out", [listing])


def test_nnunet_naming_writes_case_label_maps_only(tmp_path):
    assert (nnunet_case(Path("x/case_0000.nii.gz")), nnunet_case(Path("scan.png"))) == ("case", "scan")
    one, two = _png(tmp_path / "in" / "c1_0000.png"), _png(tmp_path / "in" / "c2_0000.png")
    stems = output_stems(tmp_path / "out", [(one.parent, one), (two.parent, two)], "nnunet")
    assert list(stems.values()) == [tmp_path / "out" / "c1", tmp_path / "out" / "c2"]
    image = read_image(one)
    score = np.zeros((8, 10), np.float32)
    score[2:4, 2:5] = 0.9
    record = write_prediction(Prediction(image, score, score > 0.5), stems[one], naming="nnunet")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c1.png"]
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "out" / "c1.png")), score > 0.5)  # 0/1
    assert record["regions"][0]["area_px"] == 6
    with pytest.raises(MedanomalyError, match=r"1 file\(s\).*c1\.png"):  # nnU-Net names are refused as ours are
        check_outputs(tmp_path / "out", list(stems.values()), overwrite=False, naming="nnunet")


def test_prediction_files_by_every_naming(tmp_path):
    image = _png(tmp_path / "data" / "imagesTs" / "c1_0000.png")
    preds = tmp_path / "preds"
    flat = _png(preds / "c1.png")  # nnU-Net: flat, without _0000
    cache: dict = {}
    assert prediction_files(preds, tmp_path / "data", image, [], cache) == [flat]
    ours = _png(preds / "imagesTs" / "c1_0000_pred.png")  # predict's name, mirroring the data
    _png(preds / "imagesTs" / "c1_0000_score.tif")
    assert prediction_files(preds, tmp_path / "data", image, [], {}) == [flat, ours]  # two: ambiguous
    assert score_file(ours, {}) == preds / "imagesTs" / "c1_0000_score.tif" and score_file(flat, {}) is None


def _labels_prediction(image, shape: tuple[int, ...]) -> Prediction:
    """Two labels (1 edema, 2 NCR/NET): edema a 2 x 3 region, NCR/NET a 1 x 2 one."""
    score = np.zeros((2, *shape), np.float32)
    mask = np.zeros(shape, np.uint8)
    score[(0, *np.s_[1:3, 2:5])] = 0.9
    mask[1:3, 2:5] = 1
    score[(1, *np.s_[4:5, 0:2])] = 0.8
    mask[4:5, 0:2] = 2
    return Prediction(image, score, mask, (Label(1, "edema"), Label(2, "NCR/NET")))


def test_several_labels_write_a_label_map_one_score_map_per_label_and_regions_per_label(tmp_path):
    image = read_image(_png(tmp_path / "scan.png", size=(6, 7)))
    pred = _labels_prediction(image, (6, 7))
    record = write_prediction(pred, tmp_path / "out" / "scan")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "scan_overlay.png", "scan_pred.png", "scan_score_NCR-NET.tif", "scan_score_edema.tif"]
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "out" / "scan_pred.png")), pred.mask)  # values
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "scan_score_edema.tif"), pred.score[0])
    overlay = np.asarray(PILImage.open(tmp_path / "out" / "scan_overlay.png"))
    assert tuple(overlay[1, 2]) == LABEL_RGB[0] and tuple(overlay[4, 0]) == LABEL_RGB[1]  # a colour per label
    assert [(r["label_value"], r["label_name"], r["area_px"]) for r in record["regions"]] == [
        (1, "edema", 6), (2, "NCR/NET", 2)]
    assert [p for _, p in iter_inputs([tmp_path / "out"])] == []  # per-label score maps are outputs, not inputs


def test_several_labels_in_a_volume_keep_the_geometry_and_values_and_nnunet_names(tmp_path):
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((7, 6, 3), np.float32), affine), tmp_path / "vol.nii.gz")
    image = read_image(tmp_path / "vol.nii.gz")  # (1, 3, 6, 7)
    score = np.zeros((2, 3, 6, 7), np.float32)
    mask = np.zeros((3, 6, 7), np.uint8)
    mask[1, 1:3, 2:5], mask[2, 4, 0:2] = 1, 2
    pred = Prediction(image, score, mask, (Label(1, "edema"), Label(2, "enhancing")))
    write_prediction(pred, tmp_path / "a" / "vol")
    back = nib.load(tmp_path / "a" / "vol_pred.nii.gz")
    np.testing.assert_array_equal(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask.transpose(2, 1, 0))
    assert nib.load(tmp_path / "a" / "vol_score_enhancing.nii.gz").shape == (7, 6, 3)
    write_prediction(pred, tmp_path / "b" / "vol", naming="nnunet")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["vol.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "b" / "vol.nii.gz").dataobj), mask.transpose(2, 1, 0))


@pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial")
def test_several_labels_of_a_dicom_series_give_a_seg_of_one_segment_per_label(tmp_path):
    series = Path(os.environ["MEDANOMALY_SHARED_DATA"]) / "dicom-series" / "mr-gre-fieldmap-axial"
    image = read_image(series)
    mask = np.zeros(image.spatial_shape, np.uint8)
    mask[3, 10:20, 10:20], mask[20, 30:40, 5:9] = 1, 3
    pred = Prediction(image, np.zeros((2, *mask.shape), np.float32), mask, (Label(1, "edema"), Label(3, "necrosis")))
    record = write_prediction(pred, tmp_path / "out" / "series", dicom_seg=True)
    assert record["dicom_seg"] == "series_seg.dcm"
    segments, names = read_dicom_seg_labels(tmp_path / "out" / "series_seg.dcm", series)
    assert names == ("edema", "necrosis")
    np.testing.assert_array_equal(segments, np.select([mask == 1, mask == 3], [1, 2], 0))
