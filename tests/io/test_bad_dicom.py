"""DICOM files and series that the readers must refuse or correct: series mixing slice geometries
(orientation, pixel spacing, size), gaps, photometric interpretations, rescale and pixel padding as
the standard defines them. Every file is the real data of ../shared/data or a copy modified here
with pydicom; the refusals run through ``medanomaly train`` (exit 2, nothing written)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from medanomaly.core.errors import MedanomalyError
from medanomaly.io import read_image

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
DICOM = DATA / "dicom"
FIELDMAP = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
MPRAGE = DATA / "dicom-series" / "mr-t1-mprage-sagittal"
pytestmark = pytest.mark.shared_data("dicom", "dicom-series")


# --- builders: a folder -> the bad series or file made in it ------------------------------------------

def _fieldmap(folder: Path) -> Path:
    return Path(shutil.copytree(FIELDMAP, folder / "series"))


def _edit(files: list[Path], change: Callable[[pydicom.Dataset], None]) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        change(ds)
        ds.save_as(f)


def _series_two_orientations(folder: Path) -> Path:
    series = _fieldmap(folder)
    _edit(sorted(series.glob("*.dcm"))[24:], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    return series


def _series_two_spacings(folder: Path) -> Path:
    series = _fieldmap(folder)
    _edit(sorted(series.glob("*.dcm"))[18:], lambda ds: setattr(ds, "PixelSpacing", [1.5, 1.5]))
    return series


def _series_with_localizer(folder: Path) -> Path:
    """Three sagittal MPRAGE slices (256x256, 1 mm) filed under the axial field map's series UID, as a
    localizer exported into the series folder."""
    series = _fieldmap(folder)
    uid = pydicom.dcmread(series / "00001.dcm").SeriesInstanceUID
    for k, f in enumerate(sorted(MPRAGE.glob("*.dcm"))[80:83]):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.save_as(series / f"loc{k}.dcm")
    return series


def _series_one_bad_orientation(folder: Path) -> Path:
    series = _fieldmap(folder)
    _edit([series / "00010.dcm"], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))
    return series


def _mr_copy(folder: Path, change: Callable[[pydicom.Dataset], None], name: str = "mr.dcm") -> Path:
    ds = pydicom.dcmread(DICOM / "MR_small.dcm")
    change(ds)
    ds.save_as(folder / name)
    return folder / name


def _slope_zero(ds: pydicom.Dataset) -> None:
    ds.RescaleSlope, ds.RescaleIntercept = 0, 0


def _unknown_photometric(ds: pydicom.Dataset) -> None:
    ds.PhotometricInterpretation = "HSV"  # retired since 2004


def _rgb_one_sample(ds: pydicom.Dataset) -> None:
    ds.PhotometricInterpretation = "RGB"


#: kind -> (builder(folder) -> the path the message names, regex the message must match)
REFUSED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "series-two-orientations": (_series_two_orientations, (
        r"holds slices of 2 different geometries.*slice 00025\.dcm is coronal \(row \[1,0,0\], column \[0,0,-1\]\) "
        r"but 00001\.dcm is axial.*24 slices 64x64, 3x3 mm pixels, axial.*12 slices 64x64, 3x3 mm pixels, coronal"
        r".*own folder")),
    "series-two-pixel-spacings": (_series_two_spacings, (
        r"2 different geometries.*slice 00019\.dcm has 1\.5x1\.5 mm pixels but 00001\.dcm has 3x3 mm.*18 slices "
        r"64x64, 3x3 mm.*18 slices 64x64, 1\.5x1\.5 mm")),
    "series-with-localizer": (_series_with_localizer, (
        r"2 different geometries.*slice loc0\.dcm is 256x256 but 00001\.dcm is 64x64.*sagittal.*36 slices 64x64.*"
        r"3 slices 256x256, 1x1 mm pixels, sagittal.*loc0\.dcm loc1\.dcm loc2")),
    "series-one-slice-bad-orientation": (_series_one_bad_orientation,
                                         r"00010\.dcm: ImageOrientationPatient \[.*\] is not two perpendicular unit"),
    "dicom-rescale-slope-zero": (lambda d: _mr_copy(d, _slope_zero), r"mr\.dcm: RescaleSlope 0 .*fix the header"),
    "dicom-unknown-photometric": (lambda d: _mr_copy(d, _unknown_photometric),
                                  r"PhotometricInterpretation 'HSV' is not read.*convert"),
    "dicom-photometric-samples-mismatch": (lambda d: _mr_copy(d, _rgb_one_sample),
                                           r"'RGB' needs 3 samples per pixel but SamplesPerPixel is 1"),
}


def _train_data(tmp_path: Path, build: Callable[[Path], Path]) -> tuple[Path, Path]:
    """(data folder, the bad input): the bad one in training case p1, real MR slices in p2 and p3."""
    data = tmp_path / "data"
    for case in ("p1", "p2", "p3"):
        (data / case).mkdir(parents=True)
    for case in ("p2", "p3"):
        shutil.copy(DICOM / "MR_small.dcm", data / case / f"{case}.dcm")
    (data / "splits.json").write_text(json.dumps({"train": ["p1", "p2"], "val": ["p3"], "test": []}))
    return data, build(data / "p1")


def _refuses(kind: str, tmp_path: Path, cli, flags: list[str]) -> None:
    build, says = REFUSED[kind]
    data, bad = _train_data(tmp_path, build)
    out = tmp_path / "model"
    err = cli.refuses("train", data, "--out", out, "--task", "anomaly", *flags, says=says, untouched=(data, out))
    assert cli.names(err, bad), err


def test_bad_series_two_orientations(tmp_path: Path, cli, tiny_train_flags) -> None:
    _refuses("series-two-orientations", tmp_path, cli, tiny_train_flags)


def test_bad_series_two_pixel_spacings(tmp_path: Path, cli, tiny_train_flags) -> None:
    _refuses("series-two-pixel-spacings", tmp_path, cli, tiny_train_flags)


def test_bad_series_with_localizer(tmp_path: Path, cli, tiny_train_flags) -> None:
    _refuses("series-with-localizer", tmp_path, cli, tiny_train_flags)


def test_bad_series_one_slice_bad_orientation(tmp_path: Path, cli, tiny_train_flags) -> None:
    _refuses("series-one-slice-bad-orientation", tmp_path, cli, tiny_train_flags)


def test_bad_dicom_rescale_slope_zero(tmp_path: Path, cli, tiny_train_flags) -> None:
    _refuses("dicom-rescale-slope-zero", tmp_path, cli, tiny_train_flags)


def test_bad_dicom_unknown_photometric(tmp_path: Path, cli, tiny_train_flags) -> None:
    _refuses("dicom-unknown-photometric", tmp_path, cli, tiny_train_flags)


def test_bad_dicom_photometric_samples_mismatch(tmp_path: Path, cli, tiny_train_flags) -> None:
    _refuses("dicom-photometric-samples-mismatch", tmp_path, cli, tiny_train_flags)


def test_rescale_slope_nan_or_inf_is_refused(tmp_path: Path) -> None:
    for slope in ("NaN", "inf"):
        with warnings.catch_warnings():  # pydicom warns that these are no valid DS values: the point here
            warnings.simplefilter("ignore")
            path = _mr_copy(tmp_path, lambda ds, s=slope: setattr(ds, "RescaleSlope", s), f"{slope}.dcm")
        with pytest.raises(MedanomalyError, match="RescaleSlope (nan|inf) "):
            read_image(path)


def test_two_consistent_groups_list_at_most_four(tmp_path: Path) -> None:
    """Six orientations in one folder: the message lists four groups and counts the rest."""
    series = _fieldmap(tmp_path)
    files = sorted(series.glob("*.dcm"))
    for k in range(1, 6):
        angle = np.deg2rad(10 * k)
        _edit(files[6 * k: 6 * k + 6], lambda ds, a=angle: setattr(
            ds, "ImageOrientationPatient", [float(np.cos(a)), float(np.sin(a)), 0, -float(np.sin(a)), float(np.cos(a)), 0]))
    with pytest.raises(MedanomalyError, match=r"6 different geometries.*; and 2 more\. Put each group"):
        read_image(series)


# --- corrected, not refused ---------------------------------------------------------------------------

def test_gap_is_reported_naming_the_slices(tmp_path: Path, caplog) -> None:
    series = _fieldmap(tmp_path)
    files = sorted(series.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).SliceLocation))
    files[10].unlink()
    with caplog.at_level(logging.WARNING, logger="medanomaly.io"):
        img = read_image(series)
    assert img.spatial_shape == (35, 64, 64)
    assert f"7.200 mm between {files[9].name} and {files[11].name}, where the others are 3.600 mm apart" in caplog.text
    assert "add the missing slices" in caplog.text


def test_monochrome1_is_inverted_so_high_means_bright(tmp_path: Path) -> None:
    """MR_small stored as MONOCHROME1 (stored values mirrored in the int16 range) reads as the original."""
    original = read_image(DICOM / "MR_small.dcm").array

    def to_monochrome1(ds: pydicom.Dataset) -> None:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = (-1 - ds.pixel_array.astype(np.int32)).astype(np.int16).tobytes()  # -32768 + 32767 - x

    np.testing.assert_array_equal(read_image(_mr_copy(tmp_path, to_monochrome1)).array, original)

    def with_inverse_shape(ds: pydicom.Dataset) -> None:  # DX files say INVERSE too: not a second inversion
        to_monochrome1(ds)
        ds.PresentationLUTShape = "INVERSE"

    np.testing.assert_array_equal(read_image(_mr_copy(tmp_path, with_inverse_shape, "dx.dcm")).array, original)


def test_monochrome1_series_is_inverted_the_same_way_in_every_slice(tmp_path: Path) -> None:
    series = _fieldmap(tmp_path)

    def to_monochrome1(ds: pydicom.Dataset) -> None:  # 12 bits stored, unsigned: 0..4095
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = (4095 - ds.pixel_array).astype(np.uint16).tobytes()

    _edit(sorted(series.glob("*.dcm")), to_monochrome1)
    np.testing.assert_array_equal(read_image(series).array, read_image(FIELDMAP).array)


def _ct_with_padding(folder: Path, limit: int | None = None) -> tuple[Path, np.ndarray]:
    """CT_small with an 8-pixel border of padding (stored -2000 .. limit), as outside a CT's round
    field of view; returns the file and the border mask."""
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    stored = ds.pixel_array.copy()
    border = np.ones(stored.shape, bool)
    border[8:-8, 8:-8] = False
    stored[border] = -2000 if limit is None else np.linspace(-2000, limit, border.sum()).astype(np.int16)
    ds.PixelData = stored.tobytes()
    if limit is not None:
        ds.add_new(0x00280121, "SS", limit)  # Pixel Padding Range Limit, signed like the pixels
    ds.save_as(folder / "ct.dcm")
    return folder / "ct.dcm", border


@pytest.mark.parametrize("limit", [None, -1990])
def test_pixel_padding_is_not_read_as_tissue(tmp_path: Path, limit: int | None) -> None:
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    assert int(ds.PixelPaddingValue) == -2000  # the real file declares its padding value
    path, border = _ct_with_padding(tmp_path, limit)
    a = read_image(path).array[0]
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(a[~border], hu[~border].astype(np.float32))
    assert (a[border] == a[~border].min()).all() and a.min() > -1100  # not -3024 HU


def test_padding_of_a_series_is_filled_with_the_volume_minimum(tmp_path: Path) -> None:
    series = _fieldmap(tmp_path)
    _edit(sorted(series.glob("*.dcm")), lambda ds: ds.add_new(0x00280120, "US", 0))  # Pixel Padding Value
    plain, padded = read_image(FIELDMAP).array, read_image(series).array
    pad = plain == 0
    assert pad.any() and (padded[pad] == plain[~pad].min()).all()
    np.testing.assert_array_equal(padded[~pad], plain[~pad])


def test_palette_color_is_expanded_to_rgb(tmp_path: Path) -> None:
    lut = (np.arange(256, dtype=np.uint16) * 257)

    def to_palette(ds: pydicom.Dataset) -> None:
        idx = (ds.pixel_array.astype(float) / ds.pixel_array.max() * 255).astype(np.uint8)
        ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "PALETTE COLOR", 8, 8, 7
        ds.PixelRepresentation, ds.PixelData = 0, idx.tobytes()
        for k, values in enumerate((lut, lut[::-1], lut // 2)):  # red, green, blue
            ds.add_new(0x00281101 + k, "US", [256, 0, 16])  # ...PaletteColorLookupTableDescriptor
            ds.add_new(0x00281201 + k, "OW", values.astype("<u2").tobytes())  # ...PaletteColorLookupTableData
        ds.indices = idx

    ds = pydicom.dcmread(DICOM / "MR_small.dcm")
    to_palette(ds)
    idx = ds.indices
    del ds.indices
    ds.save_as(tmp_path / "palette.dcm")
    img = read_image(tmp_path / "palette.dcm")
    assert img.channels == 3
    np.testing.assert_array_equal(img.array, np.stack([lut[idx], lut[::-1][idx], (lut // 2)[idx]]).astype(np.float32))


def _multiframe(tmp_path: Path, groups: dict) -> Path:
    """MR_small as a 2-frame enhanced-style file whose rescale lives only in functional groups."""
    ds = pydicom.dcmread(DICOM / "MR_small.dcm")
    raw = ds.pixel_array
    ds.NumberOfFrames, ds.PixelData = 2, np.stack([raw, raw]).tobytes()
    for name, items in groups.items():
        setattr(ds, name, [_group(*item) for item in items])
    ds.save_as(tmp_path / "enhanced.dcm")
    return tmp_path / "enhanced.dcm"


def _group(slope: float, intercept: float) -> Dataset:
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "US"
    group = Dataset()
    group.PixelValueTransformationSequence = [transform]
    return group


def test_rescale_in_functional_groups_is_applied(tmp_path: Path) -> None:
    raw = pydicom.dcmread(DICOM / "MR_small.dcm").pixel_array.astype(np.float32)
    shared = read_image(_multiframe(tmp_path, {"SharedFunctionalGroupsSequence": [(2, -100)]})).array
    np.testing.assert_array_equal(shared, np.stack([raw * 2 - 100] * 2)[None])
    per_frame = read_image(_multiframe(tmp_path, {"PerFrameFunctionalGroupsSequence": [(1, 0), (3, 5)]})).array
    np.testing.assert_array_equal(per_frame, np.stack([raw, raw * 3 + 5])[None])


def test_a_lone_rescale_slope_is_applied(tmp_path: Path) -> None:
    raw = pydicom.dcmread(DICOM / "MR_small.dcm").pixel_array
    path = _mr_copy(tmp_path, lambda ds: setattr(ds, "RescaleSlope", 2))
    np.testing.assert_array_equal(read_image(path).array[0], raw * 2.0)


def test_real_files_read_as_before(tmp_path: Path) -> None:
    """The real CT keeps its HU (it declares padding but holds none) and the real series read whole."""
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    np.testing.assert_array_equal(read_image(DICOM / "CT_small.dcm").array[0],
                                  (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32))
    assert read_image(MPRAGE).spatial_shape == (176, 256, 256)


def test_predict_reports_a_series_of_two_orientations(tmp_path: Path, cli, tiny_lgg_model: Path) -> None:
    """The issue's example, through predict: it was stacked with the first slice's geometry (exit 0);
    now predict reports the series as failed (exit 1, as for any unreadable input) and writes no
    output for it."""
    (tmp_path / "in").mkdir()
    series = _series_two_orientations(tmp_path / "in")
    rc, err = cli("predict", tiny_lgg_model, series, "--out", tmp_path / "out")
    assert rc == 1 and "Traceback" not in err, err
    assert cli.names(err, series) and cli.says(err, r"2 different geometries.*coronal.*axial"), err
    assert not cli.outputs_of(tmp_path / "out", "series")
