"""Several input channels: grouping of channel files (nnU-Net ``_0000``/``_0001``, BraTS-style modality
tokens, 2D PNG), dataset.json names, the check that all cases agree, and the tiny end-to-end runs
(train -> predict -> evaluate) on a two-channel nnU-Net layout and a two-channel PNG layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.data.channels import DatasetInfo, check_channel_sets, group_channels, nnunet_info, read_dataset_json
from medanomaly.data.discover import discover, group_inputs, read_sample


def _nnunet(root: Path, n_cases: int = 4, channels: int = 2, names: tuple[str, ...] | None = ("FLAIR", "T1"),
            shape: tuple[int, ...] = (3, 24, 24), test_cases: int = 1) -> Path:
    """A tiny nnU-Net raw data set of NIfTI phantoms: channel 0 bright in the lesion, channel 1 dark."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases + test_cases):
        m = np.zeros(shape, np.uint8)
        m[..., 8:16, 8:16] = 1
        folder = "imagesTr" if i < n_cases else "imagesTs"
        for c in range(channels):
            a = rng.normal(100, 10, shape) + (80.0 if c == 0 else -30.0) * m
            nib.save(nib.Nifti1Image(a.astype(np.float32), np.eye(4)), root / folder / f"case{i}_{c:04d}.nii.gz")
        if i < n_cases:
            nib.save(nib.Nifti1Image(m, np.eye(4)), root / "labelsTr" / f"case{i}.nii.gz")
    if names is not None:
        (root / "dataset.json").write_text(json.dumps({"channel_names": dict(enumerate(names)), "file_ending": ".nii.gz",
                                                       "labels": {"background": 0, "lesion": 1}}))
    cases = [f"case{i}" for i in range(n_cases)]
    (root / "splits.json").write_text(json.dumps({"train": cases[:-2], "val": cases[-2:-1], "test": cases[-1:]}))
    return root


def test_nnunet_channels_grouped_with_dataset_json_names(tmp_path):
    root = _nnunet(tmp_path / "d")
    train = [s for s in discover(root) if s.mask is not None]
    assert [s.case for s in train] == ["case0", "case1", "case2", "case3"]
    s = train[0]
    assert [p.name for p in s.files] == ["case0_0000.nii.gz", "case0_0001.nii.gz"] and s.image == s.files[0]
    assert s.channel_names == ("FLAIR", "T1") and s.mask.name == "case0.nii.gz"
    img = read_sample(s)
    assert img.channels == 2 and img.spatial_shape == read_sample(train[1]).spatial_shape
    assert img.geometry.meta["channel_names"] == ("FLAIR", "T1")
    assert img.array[0, 10, 10, 0] > img.array[1, 10, 10, 0]  # channel order kept


def test_nnunet_without_dataset_json_groups_unnamed(tmp_path):
    root = _nnunet(tmp_path / "d", names=None)
    s = discover(root)[0]
    assert len(s.files) == 2 and s.channel_names == ()


def test_one_channel_nnunet_unchanged(tmp_path):
    root = _nnunet(tmp_path / "d", channels=1, names=None)
    s = discover(root)[0]
    assert s.files == (s.image,) and s.channels == () and s.key == "case0" and s.mask is not None


def test_numbered_slices_outside_nnunet_folders_are_not_channels(tmp_path):
    for k in range(3):
        PILImage.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(tmp_path / f"slice_{k:04d}.png")
    assert [len(s.files) for s in discover(tmp_path)] == [1, 1, 1]


def test_brats_style_modalities_grouped_in_fixed_order(tmp_path):
    case = tmp_path / "BraTS_001"
    case.mkdir()
    for tok in ("t2", "flair", "t1ce", "t1"):  # written out of order
        nib.save(nib.Nifti1Image(np.full((2, 8, 8), len(tok), np.float32), np.eye(4)), case / f"BraTS_001_{tok}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((2, 8, 8), np.uint8), np.eye(4)), case / "BraTS_001_seg.nii.gz")
    (s,) = discover(tmp_path)
    assert s.channel_names == ("FLAIR", "T1", "T1CE", "T2") and s.case == "BraTS_001"
    assert [p.name for p in s.files][0] == "BraTS_001_flair.nii.gz" and s.mask.name == "BraTS_001_seg.nii.gz"
    assert read_sample(s).channels == 4


def test_lone_modality_file_stays_one_unnamed_channel(tmp_path):
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "X_flair.png")
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "X_mask.png")
    (s,) = discover(tmp_path)
    assert s.channels == () and s.channel_names == () and s.mask is not None


def test_read_dataset_json_forms(tmp_path):
    assert read_dataset_json(tmp_path) is None
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"1": "T1", "0": "CT"}}))  # MSD form
    assert read_dataset_json(tmp_path) == DatasetInfo(("CT", "T1"), None)
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "A", "2": "B"}}))
    with pytest.raises(MedanomalyError, match="channel numbers 0, 1"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").unlink()
    assert nnunet_info(tmp_path / "imagesTs") == DatasetInfo()  # imagesTs named so: nnU-Net without a dataset.json
    assert nnunet_info(tmp_path / "images") is None


def test_group_channels_refuses_two_files_of_one_channel(tmp_path):
    entries = [(tmp_path / "X_t1ce.nii.gz", None, "X_t1ce"), (tmp_path / "X_t1gd.nii.gz", None, "X_t1gd")]
    with pytest.raises(MedanomalyError, match="same channel of one case"):
        group_channels(entries, None)


def test_check_channel_sets_names_the_odd_case(tmp_path):
    full = group_channels([(tmp_path / f"a_{c:04d}.png", None, "a") for c in range(2)], DatasetInfo())
    part = group_channels([(tmp_path / "b_0000.png", None, "b")], DatasetInfo())
    check_channel_sets([("a", full[0])])
    with pytest.raises(MedanomalyError, match="case b has channels 0000 but the data set's cases have 0000, 0001"):
        check_channel_sets([("a", full[0]), ("a2", full[0]), ("b", part[0])])
    with pytest.raises(MedanomalyError, match="case a has channels 0000 but"):  # dataset.json names two channels
        check_channel_sets([("a", part[0])], ("FLAIR", "T1"))


def test_group_inputs_for_predict(tmp_path):
    root = _nnunet(tmp_path / "d")
    files = sorted((root / "imagesTs").iterdir())
    items, samples = group_inputs([(f.parent, f) for f in files], channels=2)
    assert [p.name for _, p in items] == ["case4_0000.nii.gz"] and samples[items[0][1]].channel_names == ("FLAIR", "T1")
    loose = tmp_path / "loose"  # one case's channel files given anywhere, to a two-channel model
    loose.mkdir()
    for f in files:
        (loose / f.name).write_bytes(f.read_bytes())
    items, samples = group_inputs([(loose, loose / f.name) for f in files], channels=2)
    assert len(items) == 1 and len(samples[items[0][1]].files) == 2
    items, _ = group_inputs([(loose, loose / f.name) for f in files], channels=1)  # one-channel model: as before
    assert len(items) == 2


def test_end_to_end_two_channel_nnunet(tmp_path, cli, tiny_train_flags):
    """train -> predict (imagesTs/) -> evaluate on a two-channel nnU-Net raw data set; the model file
    records the channel names, and a one-channel input is refused by name."""
    root = _nnunet(tmp_path / "d")
    model, pred, ev = tmp_path / "m", tmp_path / "p", tmp_path / "e"
    assert cli("train", root, "--out", model, *tiny_train_flags)[0] == 0
    spec = json.loads((model / "model.json").read_text())["input"]
    assert spec["channels"] == 2 and spec["channel_names"] == ["FLAIR", "T1"]
    assert cli("predict", model, root / "imagesTs", "--out", pred)[0] == 0
    assert (pred / "case4_0000_pred.nii.gz").is_file()
    assert cli("evaluate", "--model", model, "--data", root, "--out", ev)[0] == 0
    assert json.loads((ev / "summary.json").read_text())


def test_end_to_end_two_channel_png(tmp_path, cli, tiny_train_flags):
    """A 2D nnU-Net layout of PNGs, one file per channel: trained and predicted as two-channel images."""
    root = tmp_path / "d"
    rng = np.random.default_rng(1)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        m = np.zeros((32, 32), np.uint8)
        m[8:16, 8:16] = 1
        for c in range(2):
            a = (rng.random((32, 32)) * 100 + (120 if c == 0 else 0) * m).astype(np.uint8)
            PILImage.fromarray(a).save(root / "imagesTr" / f"img{i}_{c:04d}.png")
        PILImage.fromarray(m).save(root / "labelsTr" / f"img{i}.png")
    (root / "splits.json").write_text(json.dumps({"train": ["img0", "img1"], "val": ["img2"], "test": ["img3"]}))
    assert all(len(s.files) == 2 for s in discover(root))
    model = tmp_path / "m"
    assert cli("train", root, "--out", model, *tiny_train_flags)[0] == 0
    assert json.loads((model / "model.json").read_text())["input"]["channels"] == 2
    assert cli("predict", model, root / "imagesTr", "--out", tmp_path / "p")[0] == 0
    assert len(list((tmp_path / "p").glob("*_pred.png"))) == 4
    listing = tmp_path / "todo.csv"  # the same image as a CSV row of channel columns: one two-channel image
    listing.write_text("image_0000,image_0001\nd/imagesTr/img0_0000.png,d/imagesTr/img0_0001.png\n")
    rc, err = cli("predict", model, listing, "--out", tmp_path / "q")
    assert rc == 0, err
    assert [p.name for p in (tmp_path / "q").rglob("*_pred.png")] == ["img0_0000_pred.png"]


def test_end_to_end_two_channel_3d(tmp_path, cli):
    """A 3D model of two channels predicts an imagesTs/ case from its two channel files (one image)."""
    root = _nnunet(tmp_path / "d", shape=(16, 24, 24))
    model, pred = tmp_path / "m", tmp_path / "p"
    assert cli("train", root, "--out", model, "--dim", "3", "--no-plan", "--epochs", "1", "--patches-per-epoch", "2",
               "--patch", "8", "16", "16", "--spacing", "1", "1", "1", "--width", "4", "--depth", "2", "--norm",
               "instance", "--device", "cpu")[0] == 0
    assert json.loads((model / "model.json").read_text())["input"]["channels"] == 2
    rc, err = cli("predict", model, root / "imagesTs", "--out", pred)
    assert rc == 0, err
    assert (pred / "case4_0000_pred.nii.gz").is_file() and not (pred / "case4_0001_pred.nii.gz").exists()
    assert nib.load(pred / "case4_0000_pred.nii.gz").shape == nib.load(root / "imagesTs" / "case4_0000.nii.gz").shape
