"""Bad multi-channel data, end to end (README, "Bad input"): each refused with exit 2, a message naming
the case or files and the fix, no traceback, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def _nnunet(root: Path, n_cases: int = 4, names: tuple[str, ...] | None = ("FLAIR", "T1"), channels: int = 2) -> Path:
    """A tiny two-channel nnU-Net raw data set (NIfTI 3 x 16 x 16)."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        m = np.zeros((16, 16, 3), np.uint8)
        m[4:10, 4:10] = 1
        for c in range(channels):
            nib.save(nib.Nifti1Image((rng.random(m.shape) * 100 + 50.0 * m).astype(np.float32), np.eye(4)),
                     root / "imagesTr" / f"case{i}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(m, np.eye(4)), root / "labelsTr" / f"case{i}.nii.gz")
    if names is not None:
        (root / "dataset.json").write_text(json.dumps({"channel_names": dict(enumerate(names)), "file_ending": ".nii.gz"}))
    return root


def test_bad_missing_channel(tmp_path, cli, tiny_train_flags):
    """A case without its _0001 file: not a silently unlabelled extra case but an error naming it."""
    data = _nnunet(tmp_path / "d")
    (data / "imagesTr" / "case2_0001.nii.gz").unlink()
    cli.refuses("train", data, "--out", tmp_path / "out" / "m", *tiny_train_flags,
                says=r"case case2 has channels 0000 but the data set's cases have 0000, 0001.*add the missing",
                untouched=(data, tmp_path / "out"))


def test_bad_extra_channel_without_dataset_json(tmp_path, cli, tiny_train_flags):
    """Without a dataset.json the majority of the cases decides; the odd one is named."""
    data = _nnunet(tmp_path / "d", names=None)
    src = data / "imagesTr" / "case0_0001.nii.gz"
    (data / "imagesTr" / "case0_0002.nii.gz").write_bytes(src.read_bytes())
    cli.refuses("train", data, "--out", tmp_path / "out" / "m", *tiny_train_flags,
                says=r"case case0 has channels 0000, 0001, 0002 but", untouched=(data, tmp_path / "out"))


def test_bad_channel_grid_mismatch(tmp_path, cli, tiny_train_flags):
    """Channel files of one case on different grids: an error naming both files."""
    data = _nnunet(tmp_path / "d")
    odd = data / "imagesTr" / "case1_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 16, 3), np.float32), np.eye(4)), odd)
    err = cli.refuses("train", data, "--out", tmp_path / "out" / "m", *tiny_train_flags,
                      says=r"case1_0001.nii.gz is 3x16x12 but .*case1_0000.nii.gz is 3x16x16.*co-registered",
                      untouched=(data,))
    assert cli.names(err, odd)


def test_bad_channel_placement_mismatch(tmp_path, cli, tiny_train_flags):
    """Same size, other spacing: not co-registered either."""
    data = _nnunet(tmp_path / "d")
    odd = data / "imagesTr" / "case1_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 3), np.float32), np.diag([2.0, 1.0, 1.0, 1.0])), odd)
    cli.refuses("train", data, "--out", tmp_path / "out" / "m", *tiny_train_flags,
                says=r"case1_0001.nii.gz is placed differently from .*case1_0000.nii.gz \(spacing", untouched=(data,))


def test_bad_dataset_json(tmp_path, cli, tiny_train_flags):
    data = _nnunet(tmp_path / "d")
    (data / "dataset.json").write_text('{"channel_names": {"0": "FLAIR", "1": ')
    cli.refuses("train", data, "--out", tmp_path / "out" / "m", *tiny_train_flags,
                says=r"cannot read .*dataset.json", untouched=(data, tmp_path / "out"))


def test_bad_duplicate_channel(tmp_path, cli, tiny_train_flags):
    """Two files of one modality in a case (X_t1ce and X_t1gd): which one is meant is unknown."""
    d = tmp_path / "d" / "X"
    d.mkdir(parents=True)
    for tok in ("flair", "t1ce", "t1gd"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), d / f"X_{tok}.nii.gz")
    cli.refuses("train", tmp_path / "d", "--out", tmp_path / "out" / "m", *tiny_train_flags,
                says=r"X_t1ce.nii.gz and .*X_t1gd.nii.gz are the same channel", untouched=(tmp_path / "d",))


def test_bad_predict_wrong_channels(tmp_path, cli, make_model_dir):
    """A FLAIR + T1 model given FLAIR alone (an nnU-Net folder whose dataset.json names one channel):
    refused by name before any output is written."""
    model = make_model_dir(tmp_path / "m", in_channels=2)
    spec = json.loads((model / "model.json").read_text())
    spec["input"]["channel_names"] = ["FLAIR", "T1"]
    (model / "model.json").write_text(json.dumps(spec))
    data = _nnunet(tmp_path / "d", names=("FLAIR",), channels=1)
    cli.refuses("predict", model, data / "imagesTr", "--out", tmp_path / "out" / "p",
                says=r"model expects FLAIR, T1 \(2 channels\); .*case0_0000.nii.gz has FLAIR \(1\)",
                untouched=(data, tmp_path / "out"))
