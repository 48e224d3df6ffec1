"""Tests for medanomaly.data.discover: layouts found by discover(), case ids and splits (tiny synthetic
folders, plus the real data sets where present)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.config.labels import Label
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import UNetConfig
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import (
    IMAGE_TOKENS,
    MASK_TOKENS,
    dataset_labels,
    discover,
    is_mask_file,
    load_splits,
    make_splits,
    resolve_splits,
    strip_token,
    with_labels,
)

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
needs_data = pytest.mark.shared_data()


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


def _by_key(samples):
    return {s.key: s for s in samples}


# ---------------------------------------------------------------- tokens


def test_strip_token():
    assert strip_token("a_mask", MASK_TOKENS) == ("a", True)
    assert strip_token("A_MASK", MASK_TOKENS) == ("A", True)
    assert strip_token("p1_3_flair", IMAGE_TOKENS) == ("p1_3", True)
    assert strip_token("c1_0000", IMAGE_TOKENS) == ("c1", True)
    assert strip_token("plain", MASK_TOKENS) == ("plain", False)
    assert strip_token("_mask", MASK_TOKENS) == ("_mask", False)  # nothing would be left


@pytest.mark.parametrize("path,expected", [
    ("a_mask.png", True),
    ("x/p1_3_mask.png", True),
    ("brain1_label.nrrd", True),
    ("c1_seg.nii.gz", True),
    ("masks/a.png", True),
    ("labelsTr/c1.nii.gz", True),
    ("a.png", False),
    ("images/a.png", False),
    ("p1/p1_3_flair.png", False),
    ("masked_image.png", False),
])
def test_is_mask_file(path, expected):
    assert is_mask_file(Path(path)) is expected


# ---------------------------------------------------------------- discover: layouts


def test_siblings_layout(tmp_path):
    _png(tmp_path / "a.png", _grey())
    _png(tmp_path / "a_mask.png", _mask())
    _png(tmp_path / "b.png", _grey(1))  # no mask
    samples = discover(tmp_path)
    assert [s.key for s in samples] == ["a", "b"]
    by = _by_key(samples)
    assert by["a"].image == tmp_path / "a.png" and by["a"].mask == tmp_path / "a_mask.png"
    assert by["b"].mask is None
    assert by["a"].case == "a" and by["b"].case == "b"


def test_patient_folder_layout_case_ids_and_natural_order(tmp_path):
    for pid in ("p1", "p2"):
        for n in (10, 2, 1):
            _png(tmp_path / pid / f"{pid}_{n}_flair.png", _grey(n))
            _png(tmp_path / pid / f"{pid}_{n}_mask.png", _mask(lesion=n == 2))
    samples = discover(tmp_path)
    assert len(samples) == 6
    assert all(s.mask is not None for s in samples)
    assert {s.case for s in samples} == {"p1", "p2"}
    p1 = [s for s in samples if s.case == "p1"]
    assert [s.key for s in p1] == ["p1_1", "p1_2", "p1_10"]
    assert [s.image.name for s in p1] == ["p1_1_flair.png", "p1_2_flair.png", "p1_10_flair.png"]
    assert [s.mask.name for s in p1] == ["p1_1_mask.png", "p1_2_mask.png", "p1_10_mask.png"]
    assert [s.case for s in samples] == ["p1"] * 3 + ["p2"] * 3  # sorted by case


def test_images_masks_folders_layout(tmp_path):
    for name in ("x1", "x2"):
        _png(tmp_path / "images" / f"{name}.jpg", _grey(), fmt="JPEG")
        _png(tmp_path / "masks" / f"{name}.png", _mask())
    _png(tmp_path / "images" / "x3.jpg", _grey(), fmt="JPEG")  # no mask
    samples = discover(tmp_path)
    assert [s.key for s in samples] == ["x1", "x2", "x3"]
    by = _by_key(samples)
    assert by["x1"].mask == tmp_path / "masks" / "x1.png"
    assert by["x2"].mask == tmp_path / "masks" / "x2.png"
    assert by["x3"].mask is None
    assert [s.case for s in samples] == ["x1", "x2", "x3"]
    assert all(s.image.parent.name == "images" for s in samples)  # masks are never samples


def test_images_labels_folders_with_mask_token(tmp_path):
    _png(tmp_path / "images" / "y.png", _grey())
    _png(tmp_path / "labels" / "y_mask.png", _mask())
    (s,) = discover(tmp_path)
    assert s.mask == tmp_path / "labels" / "y_mask.png"


def _nnunet(root: Path, cases=("c1", "c2"), test_cases=("c3",)) -> None:
    rng = np.random.default_rng(0)
    for c in cases:
        _nifti(root / "imagesTr" / f"{c}_0000.nii.gz", rng.random((4, 4, 3)).astype(np.float32))
        label = np.zeros((4, 4, 3), np.uint8)
        label[1:3, 1:3, 1] = 1
        _nifti(root / "labelsTr" / f"{c}.nii.gz", label)
    for c in test_cases:
        _nifti(root / "imagesTs" / f"{c}_0000.nii.gz", rng.random((4, 4, 3)).astype(np.float32))


def test_nnunet_layout(tmp_path):
    _nnunet(tmp_path)
    samples = discover(tmp_path)
    by = _by_key(samples)
    assert set(by) == {"c1", "c2", "c3"}
    assert by["c1"].image == tmp_path / "imagesTr" / "c1_0000.nii.gz"
    assert by["c1"].mask == tmp_path / "labelsTr" / "c1.nii.gz"
    assert by["c2"].mask == tmp_path / "labelsTr" / "c2.nii.gz"
    assert by["c3"].mask is None  # imagesTs has no labels
    assert [s.case for s in samples] == ["c1", "c2", "c3"]


def test_nested_nnunet_dataset_keeps_case_ids(tmp_path):
    _nnunet(tmp_path / "Dataset001_X", test_cases=())
    samples = discover(tmp_path)
    assert [s.case for s in samples] == ["c1", "c2"]


def test_images_with_masks_png_folder(tmp_path):
    _png(tmp_path / "images" / "x.png", _grey())
    _png(tmp_path / "masks_png" / "x.png", _mask())
    samples = discover(tmp_path)
    assert len(samples) == 1 and samples[0].mask == tmp_path / "masks_png" / "x.png"


def test_image_without_mask_kept(tmp_path):
    _png(tmp_path / "lonely.png", _grey())
    (s,) = discover(tmp_path)
    assert s.mask is None and s.case == "lonely" and s.key == "lonely"


def test_single_file_root(tmp_path):
    f = _png(tmp_path / "one.png", _grey())
    (s,) = discover(f)
    assert s.image == f and s.mask is None and s.case == "one"


def test_hidden_and_non_image_files_ignored(tmp_path):
    _png(tmp_path / "a.png", _grey())
    _png(tmp_path / ".hidden.png", _grey())
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "splits.json").write_text("{}")
    assert [s.key for s in discover(tmp_path)] == ["a"]


def test_empty_folder_raises(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(MedanomalyError, match="no images found"):
        discover(tmp_path)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(MedanomalyError, match="does not exist"):
        discover(tmp_path / "nope")


# ---------------------------------------------------------------- splits


def _write_splits(path: Path, splits: dict) -> Path:
    path.write_text(json.dumps(splits))
    return path


def test_load_splits_valid(tmp_path):
    f = _write_splits(tmp_path / "s.json", {"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    assert load_splits(f, ["a", "b", "c", "d"]) == {"train": ["a", "b"], "val": ["c"], "test": ["d"]}


def test_load_splits_missing_lists_default_to_empty(tmp_path):
    f = _write_splits(tmp_path / "s.json", {"train": ["a"]})
    assert load_splits(f, ["a", "b"]) == {"train": ["a"], "val": [], "test": []}


def test_load_splits_unknown_case_named(tmp_path):
    f = _write_splits(tmp_path / "s.json", {"train": ["a"], "val": ["ghost_case"], "test": []})
    with pytest.raises(MedanomalyError) as info:
        load_splits(f, ["a", "b"])
    assert "ghost_case" in str(info.value) and "val" in str(info.value)


def test_load_splits_case_in_two_splits(tmp_path):
    f = _write_splits(tmp_path / "s.json", {"train": ["a", "b"], "val": ["b"], "test": []})
    with pytest.raises(MedanomalyError, match="more than one split"):
        load_splits(f, ["a", "b"])


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"val": []}'])
def test_load_splits_bad_file(tmp_path, text):
    f = tmp_path / "s.json"
    f.write_text(text)
    with pytest.raises(MedanomalyError):
        load_splits(f, ["a"])


def test_load_splits_missing_file(tmp_path):
    with pytest.raises(MedanomalyError):
        load_splits(tmp_path / "absent.json", ["a"])


def test_make_splits_deterministic_disjoint_complete():
    cases = [f"p{i:02d}" for i in range(20)]
    slices = [c for c in cases for _ in range(5)]  # one entry per slice: cases are the unit
    a = make_splits(slices, seed=3)
    assert a == make_splits(list(reversed(slices)), seed=3)
    assert set(a) == {"train", "val", "test"}
    together = a["train"] + a["val"] + a["test"]
    assert sorted(together) == cases  # every case exactly once: disjoint, complete, never split
    assert len(a["val"]) == 3 and len(a["test"]) == 3 and len(a["train"]) == 14
    others = [make_splits(slices, seed=s) for s in range(4, 9)]
    assert any(o != a for o in others)


@pytest.mark.parametrize("n,expected", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1))])
def test_make_splits_few_cases(n, expected):
    s = make_splits([f"c{i}" for i in range(n)], seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == expected


def test_resolve_splits_prefers_root_file(tmp_path):
    _png(tmp_path / "a.png", _grey())
    _png(tmp_path / "b.png", _grey())
    samples = discover(tmp_path)
    _write_splits(tmp_path / "splits.json", {"train": ["b"], "val": ["a"], "test": []})
    assert resolve_splits(tmp_path, samples, None, seed=0) == {"train": ["b"], "val": ["a"], "test": []}
    other = _write_splits(tmp_path / "other.json", {"train": ["a", "b"], "val": [], "test": []})
    assert resolve_splits(tmp_path, samples, other, seed=0)["train"] == ["a", "b"]
    (tmp_path / "splits.json").unlink()
    assert resolve_splits(tmp_path, samples, None, seed=5) == make_splits(["a", "b"], 5)


# ---------------------------------------------------------------- normalize / resize / to_slices


# ---------------------------------------------------------------- load_slices


def _sibling_folder(root: Path, n: int = 3) -> list:
    for i in range(n):
        _png(root / f"s{i}.png", _grey(i))
        _png(root / f"s{i}_mask.png", _mask(lesion=i % 2 == 0))
    return discover(root)


# ---------------------------------------------------------------- real data


@needs_data
def test_real_lgg_flair():
    root = DATA / "lgg-flair"
    samples = discover(root)
    assert len(samples) == 3009
    assert all(s.mask is not None for s in samples)
    assert all(s.case == s.image.parent.name for s in samples)
    assert all(s.mask.parent == s.image.parent for s in samples)
    patients = {p.name for p in root.iterdir() if p.is_dir()}
    cases = sorted({s.case for s in samples})
    assert len(cases) == 80 and set(cases) == patients
    splits = load_splits(root / "splits.json", cases)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [60, 10, 10]
    assert resolve_splits(root, samples, None, seed=0) == splits
    first = [s for s in samples if s.case == cases[0]][:3]  # natural slice order
    assert [s.image.name.rsplit("_", 2)[-2] for s in first] == ["1", "2", "3"]


@needs_data
def test_real_ph2():
    samples = discover(DATA / "ph2")
    assert len(samples) == 200
    assert all(s.mask is not None for s in samples)
    assert all(s.image.suffix == ".jpg" and s.mask.suffix == ".png" for s in samples)
    assert all(s.mask.stem == s.image.stem for s in samples)
    assert samples[0].case == "IMD002"
    assert all(s.case.startswith("IMD") and s.case == s.key for s in samples)
    assert len({s.case for s in samples}) == 200


@needs_data
def test_real_lgg_kaggle3m_sample():
    root = DATA / "lgg-kaggle3m-sample"
    samples = discover(root)
    tifs = [p for p in root.rglob("*.tif") if not p.stem.endswith("_mask")]
    assert len(samples) == len(tifs) > 0
    for s in samples:
        assert s.image.suffix == ".tif"
        assert s.mask == s.image.with_name(s.image.stem + "_mask.tif")
        assert s.case == "TCGA_CS_4941_19960909"


@needs_data
def test_real_volumes():
    samples = discover(DATA / "volumes")
    by = _by_key(samples)
    for name in ("brain1", "brain2"):
        assert by[name].image.name == f"{name}_image.nrrd"
        assert by[name].mask.name == f"{name}_label.nrrd"
        assert by[name].case == name
    assert not any(is_mask_file(s.image) for s in samples)


def test_dataset_json_labels_are_read_v2_and_v1(tmp_path):
    assert dataset_labels(tmp_path) == ()  # no dataset.json
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR"}}))
    assert dataset_labels(tmp_path) == ()  # one without labels
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "edema": 1, "enhancing": 2}}))
    assert dataset_labels(tmp_path) == (Label(1, "edema"), Label(2, "enhancing"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "edema"}}))
    assert dataset_labels(tmp_path) == (Label(1, "edema"),)


def test_the_labels_a_run_trains(tmp_path, multilabel_phantoms, caplog):
    data = multilabel_phantoms(tmp_path / "data")
    cfg = TrainConfig()
    with caplog.at_level(logging.INFO, logger="medanomaly.data.discover"):
        assert with_labels(cfg, data).labels == "1=edema,2=enhancing"  # from dataset.json
    assert "labels from" in caplog.text
    assert with_labels(replace(cfg, labels="1=a,2=b"), data).labels == "1=a,2=b"  # --labels wins
    assert with_labels(replace(cfg, task="anomaly"), data).labels is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medanomaly.data.discover"):  # 3D: binary as before, with a note
        assert with_labels(replace(cfg, model=UNetConfig(dim=3)), data) == replace(cfg, model=UNetConfig(dim=3))
    assert "not yet supported with --dim 3" in caplog.text
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    assert with_labels(cfg, data) is cfg  # one label: binary
