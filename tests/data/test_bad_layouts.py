"""Bad data folders, end to end: real LGG slices copied into tmp_path with one problem each (a
mask of the wrong size or values, no image, mixed channels, a corrupt or NaN image, a link loop...),
fed to ``medanomaly train`` and ``evaluate`` in-process.

The contract (README, "Bad input"): a user error ends with one paragraph on stderr naming the
file and the fix, exit code 2, no traceback and nothing written. :data:`OUTCOMES` lists every kind
of folder tested here with its documented outcome (the README table is made from these rows and
those of tests/io/test_predict_bad_images.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

import medanomaly.io as mio
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import discover
from medanomaly.io import read_image, read_mask

pytestmark = pytest.mark.shared_data()  # the bad-input corpus is generated from it

#: kind id -> documented outcome (the README "Bad input" table is made from these rows).
OUTCOMES: dict[str, str] = {
    "permission-denied": "`permission denied: <file>; make it readable ...`: predict exit 1, train/evaluate exit 2",
    "empty-folder": "train/evaluate: `no images found in <dir>; supported files: ...`, exit 2 (predict: 0 images, exit 0 until predict.py raises too)",
    "nonexistent-path": "train/evaluate: `data folder <dir> does not exist`; predict: `input <path> does not exist`, exit 2",
    "mask-size-mismatch": "train/evaluate: `mask 240x240 does not match image 256x256: <mask> vs <image>`, exit 2",
    "mask-values-0-128-255": "train/evaluate: `mask <file> has values {0,128,255}; expected {0,1} or {0,255} ...`, exit 2",
    "all-masks-empty": "train: `every training mask in <dir> is empty; ... use --task anomaly`, exit 2",
    "only-masks": "train/evaluate: `found N mask file(s) in <dir> (e.g. ...) but no image ...`, exit 2 (predict: 0 images, exit 0 until predict.py raises too)",
    "image-without-mask": "supervised train: the image is left out (also inside a case whose other slices have masks), exit 0",
    "channel-mismatch": "train: `<file> has 3 channels but <file> has 1; ... same channels`, exit 2",
    "corrupt-image-in-train": "train: `cannot read <file> ...`, exit 2 (one bad file stops training)",
    "nan-in-train": "train: `<file> contains 1 NaN/inf voxels ...`, exit 2",
}


# --- data folders with one problem each: builder(folder, real_lgg) -> the file or folder to name ------

def _d_mask_size(d: Path, real_lgg) -> Path:
    img, m = real_lgg.train_set(d)[real_lgg.patients[0]][0]
    PILImage.open(m).resize((240, 240), PILImage.NEAREST).save(m)
    return m


def _d_mask_values(d: Path, real_lgg) -> Path:
    _, m = real_lgg.train_set(d)[real_lgg.patients[0]][0]
    a = np.asarray(PILImage.open(m).convert("L")).copy()  # LGG masks are 1-bit PNGs
    ys, xs = np.nonzero(a)
    a[ys[: len(ys) // 2], xs[: len(xs) // 2]] = 128  # soft edge: {0, 128, 255}
    PILImage.fromarray(a).save(m)
    return m


def _d_all_empty(d: Path, real_lgg) -> Path:
    real_lgg.train_set(d, lesion=False)
    return d


def _d_only_masks(d: Path, real_lgg) -> Path:
    for pairs in real_lgg.train_set(d).values():
        for img, _ in pairs:
            img.unlink()
    return d


def _d_empty(d: Path, real_lgg) -> Path:
    return d


def _d_nonexistent(d: Path, real_lgg) -> Path:
    return d / "no such folder"


def _d_channels(d: Path, real_lgg) -> Path:
    img, _ = real_lgg.train_set(d)[real_lgg.patients[1]][0]
    PILImage.open(img).convert("RGB").save(img)
    return img


def _d_corrupt(d: Path, real_lgg) -> Path:
    img, _ = real_lgg.train_set(d)[real_lgg.patients[0]][0]
    img.write_bytes(img.read_bytes()[:3000])
    return img


def _d_nan(d: Path, real_lgg) -> Path:
    img, _ = real_lgg.train_set(d)[real_lgg.patients[0]][0]
    a = np.asarray(PILImage.open(img)).astype(np.float32)
    a[100, 100] = np.nan
    tif = img.with_suffix(".tif")
    tifffile.imwrite(tif, a)
    img.unlink()
    return tif


def _d_permission(d: Path, real_lgg) -> Path:
    return real_lgg.train_set(d)[real_lgg.patients[0]][0][1]


#: kind -> (data builder returning the file/folder the message must name, regex)
TRAIN_CASES: dict[str, tuple[Callable[[Path, object], Path], str]] = {
    "mask-size-mismatch": (_d_mask_size, r"mask 240x240 does not match image 256x256"),
    "mask-values-0-128-255": (_d_mask_values, r"has values \{0,128,255\}; expected \{0,1\} or \{0,255\}"),
    "all-masks-empty": (_d_all_empty, r"every training mask in \S.* is empty.*--task anomaly"),
    "only-masks": (_d_only_masks, r"found 3 mask file\(s\) in .* but no image"),
    "empty-folder": (_d_empty, r"no images found in"),
    "nonexistent-path": (_d_nonexistent, r"does not exist"),
    "channel-mismatch": (_d_channels, r"has 3 channels but .* has 1"),
    "corrupt-image-in-train": (_d_corrupt, r"cannot read .*truncated"),
    "nan-in-train": (_d_nan, r"contains 1 NaN/inf voxels"),
    "permission-denied": (_d_permission, r"permission denied: "),
}


def _check_clean_exit_2(cli, rc: int, err: str, named: Path, pattern: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("error:") == 1, err
    assert cli.names(err, named), (named, err)
    assert cli.says(err, pattern), err


def _bad_data(kind: str, tmp_path: Path, real_lgg, deny_read) -> tuple[Path, Path, str]:
    """(data folder, the file or folder the message must name, the message pattern) for a kind."""
    data = tmp_path / "data"
    data.mkdir()
    build, pattern = TRAIN_CASES[kind]
    named = build(data, real_lgg)
    if kind == "permission-denied":
        deny_read(named)
    return data, named, pattern


@pytest.mark.parametrize("kind", list(TRAIN_CASES))
def test_train_bad_data(kind: str, tmp_path: Path, cli, real_lgg, deny_read, tiny_train_flags) -> None:
    data, named, pattern = _bad_data(kind, tmp_path, real_lgg, deny_read)
    out = tmp_path / "model"
    rc, err = cli("train", data if kind != "nonexistent-path" else named, "--out", out, *tiny_train_flags)
    _check_clean_exit_2(cli, rc, err, named, pattern)
    for name in ("model.pt", "model.json", "checkpoint.pt", "metrics.csv"):
        assert not (out / name).exists(), name  # nothing written before the data is known to be good
    assert not cli.tmp_files(out)


EVALUATE_CASES = ["mask-size-mismatch", "mask-values-0-128-255", "only-masks", "empty-folder", "nonexistent-path",
                  "permission-denied"]


@pytest.mark.parametrize("kind", EVALUATE_CASES)
def test_evaluate_bad_data(kind: str, tiny_lgg_model: Path, tmp_path: Path, cli, real_lgg, deny_read) -> None:
    data, named, pattern = _bad_data(kind, tmp_path, real_lgg, deny_read)
    out = tmp_path / "eval"
    rc, err = cli("evaluate", "--model", tiny_lgg_model, "--data", data if kind != "nonexistent-path" else named,
                  "--split", "all", "--out", out)
    _check_clean_exit_2(cli, rc, err, named, pattern)
    for name in ("summary.json", "cases.csv", "report.html"):
        assert not (out / name).exists(), name
    assert not cli.tmp_files(out)


def test_evaluate_writes_nothing_for_a_sample_whose_mask_is_bad(tiny_lgg_model: Path, tmp_path: Path, cli,
                                                               real_lgg) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mask = _d_mask_size(data, real_lgg)
    rc, _ = cli("evaluate", "--model", tiny_lgg_model, "--data", data, "--split", "all", "--out", tmp_path / "e")
    assert rc == 2
    assert not cli.outputs_of(tmp_path / "e", mio.stem_of(mask).replace("_mask", "_flair"))


def test_image_without_mask_is_left_out_of_supervised_training(tmp_path: Path, cli, real_lgg, tiny_train_flags,
                                                               caplog) -> None:
    data = tmp_path / "data"
    data.mkdir()
    real_lgg.train_set(data)
    extra = real_lgg.slices(real_lgg.patients[0], True)[0][0]
    shutil.copy(extra, data / real_lgg.patients[0] / extra.name)  # an image without its mask, in a training case
    (data / "TCGA_EXTRA").mkdir()
    shutil.copy(extra, data / "TCGA_EXTRA" / "TCGA_EXTRA_1_flair.png")  # a case without any mask
    caplog.set_level(logging.INFO, logger="medanomaly.train.loop")
    rc, err = cli("train", data, "--out", tmp_path / "model", *tiny_train_flags)
    assert rc == 0, err
    assert "training on 2 slices (1 val)" in caplog.text  # one labelled slice per training patient
    assert "TCGA_EXTRA" not in (tmp_path / "model" / "splits.json").read_text()


def test_symlink_loops_do_not_hang_discovery(tmp_path: Path, real_lgg) -> None:
    data = tmp_path / "data"
    data.mkdir()
    real_lgg.train_set(data)
    os.symlink(data, data / real_lgg.patients[0] / "loop")
    os.symlink("self.png", data / "self.png")
    t0 = time.perf_counter()
    samples = discover(data)
    assert time.perf_counter() - t0 < 5
    assert len(samples) == 3 and all(s.mask is not None for s in samples)
    with pytest.raises(MedanomalyError, match="broken symbolic link"):
        read_image(data / "self.png")


def test_mask_reader_outcomes(tmp_path: Path, real_lgg) -> None:
    """The mask kinds at the reader level (train/evaluate see the same messages)."""
    m = _d_mask_values(tmp_path / "a", real_lgg)
    with pytest.raises(MedanomalyError, match=r"\{0,128,255\}"):
        read_mask(m)
    m = _d_mask_size(tmp_path / "b", real_lgg)
    img = read_image(m.with_name(m.name.replace("_mask", "_flair")))
    with pytest.raises(MedanomalyError, match=r"mask 240x240 does not match image 256x256"):
        read_mask(m, like=img)


def test_error_message_keeps_paths_whole(tmp_path: Path, cli) -> None:
    deep = tmp_path / ("patient-data-" * 4) / ("series-export-" * 6) / "scan"
    deep.mkdir(parents=True)
    rc, err = cli("train", deep, "--out", tmp_path / "m")
    assert rc == 2 and str(deep) in err


def test_outcomes_table_covers_every_case() -> None:
    """Every kind of folder tested here has its documented outcome; the kinds predict shares
    (permission-denied, empty-folder, only-masks, nonexistent-path) are documented here too."""
    assert set(TRAIN_CASES) | {"image-without-mask"} == set(OUTCOMES)
