"""Data parallel under torchrun: 2 CPU processes (gloo) give the result of 1 process with the same
global batch, write nothing from rank 1, resume, and split predict's files between them.

Tolerance: group norm and fp32, so the only differences are the order of float additions (batch
size of each convolution, the gradient all-reduce). Measured on this machine after 2 epochs (6 and
4 steps of Adam): max |difference| of the weights 1.8e-7 (phantoms) and 1.3e-7 (LGG), 1.8e-7 after
the resumed third epoch; asserted within atol 1e-5, rtol 1e-4. Losses and Dice in metrics.csv agree
to their 6 printed digits (asserted to 1e-5).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medanomaly.apps.cli import main
from medanomaly.core import distributed as distributed
from medanomaly.core.errors import MedanomalyError

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
LGG = DATA / "lgg-flair"
LGG_SPLITS = {"train": ["TCGA_CS_4941_19960909", "TCGA_CS_4943_20000902"], "val": ["TCGA_CS_5395_19981004"],
              "test": []}
TINY = ["--norm", "group", "--size", "32", "--width", "4", "--depth", "2", "--epochs", "2", "--batch-size", "4",
        "--precision", "fp32", "--no-plan", "--device", "cpu"]
RUN_FILES = {"checkpoint.pt", "config.json", "metrics.csv", "model.json", "model.pt", "splits.json", "train.log",
             "progress.png"}
ATOL, RTOL = 1e-5, 1e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m medanomaly ARGS`` (a free port is picked)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "medanomaly", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lgg_tiny(tmp_path_factory, shared_data) -> Path:
    """Symlinks to 4 slices of each of 3 real LGG patients (the 3 with the largest tumour and one
    without), and their split."""
    shared_data("lgg-flair")  # skips without it; the phantom variant still runs
    root = tmp_path_factory.mktemp("lgg")
    for patient in LGG_SPLITS["train"] + LGG_SPLITS["val"]:
        masks = sorted((LGG / patient).glob("*_mask.png"))
        area = {m: int(np.count_nonzero(np.asarray(PILImage.open(m)))) for m in masks}
        by_area = sorted(area, key=lambda m: -area[m])
        (root / patient).mkdir()
        for m in by_area[:3] + by_area[-1:]:
            for f in (m, m.with_name(m.name.replace("_mask.png", "_flair.png"))):
                (root / patient / f.name).symlink_to(f)
    (root / "splits.json").write_text(json.dumps(LGG_SPLITS))
    return root


def train_both(data: Path, tmp: Path, *extra: str) -> tuple[Path, Path]:
    """The same run in 1 process (in this one) and in 2 torchrun processes: (one, two)."""
    one, two = tmp / "one", tmp / "two"
    assert main(["-q", "train", str(data), "--out", str(one), *TINY, *extra]) == 0
    res = torchrun("train", str(data), "--out", str(two), *TINY, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("model written to") == 1, res.stdout  # rank 0 alone reports
    return one, two


@pytest.fixture(scope="module")
def phantom_runs(phantoms, tmp_path_factory) -> tuple[Path, Path]:
    return train_both(phantoms, tmp_path_factory.mktemp("phantom-runs"))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _metrics(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def max_weight_diff(one: Path, two: Path) -> float:
    """Largest |difference| of model.pt and of the checkpoint's weights; asserts them within tolerance."""
    worst = 0.0
    for a, b in ((_load(one / "model.pt"), _load(two / "model.pt")),
                 (_load(one / "checkpoint.pt")["model"], _load(two / "checkpoint.pt")["model"])):
        assert a.keys() == b.keys()  # no "module." prefix: the format of a single-process run
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")
            worst = max(worst, float((a[k].float() - b[k].float()).abs().max()))
    return worst


def assert_same_run(one: Path, two: Path) -> None:
    # only rank 0 wrote: exactly the files of a single-process run, no temporary leftovers
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()} == RUN_FILES
    for name in ("config.json", "splits.json"):
        assert (two / name).read_text() == (one / name).read_text(), name
    worst = max_weight_diff(one, two)
    print(f"max |weight difference| 1 vs 2 processes: {worst:.3g}")
    c1, c2 = _load(one / "checkpoint.pt"), _load(two / "checkpoint.pt")
    assert torch.equal(c1["rng"], c2["rng"]) and c1["step"] == c2["step"]  # same batches, same augmentation
    assert c1["epoch"] == c2["epoch"] and c1["best_epoch"] == c2["best_epoch"]
    rows1, rows2 = _metrics(one / "metrics.csv"), _metrics(two / "metrics.csv")
    assert [r["epoch"] for r in rows1] == [r["epoch"] for r in rows2]
    for r1, r2 in zip(rows1, rows2):
        for key in ("train_loss", "val_loss", "val_dice", "lr"):
            assert float(r2[key]) == pytest.approx(float(r1[key]), abs=1e-5, rel=1e-5), (key, r1, r2)


def test_two_processes_equal_one_on_phantoms(phantom_runs):
    assert_same_run(*phantom_runs)


def test_two_processes_equal_one_on_real_lgg_slices(lgg_tiny, tmp_path):
    assert_same_run(*train_both(lgg_tiny, tmp_path))


VOLUMES = DATA / "volumes"
TINY_3D = ["--dim", "3", "--no-plan", "--epochs", "2", "--patches-per-epoch", "4", "--patch", "16", "32", "32",
           "--spacing", "6.5", "3.125", "3.125", "--width", "4", "--depth", "2", "--norm", "instance",
           "--precision", "fp32", "--optimizer", "sgd", "--lr", "0.01", "--device", "cpu"]


@pytest.mark.shared_data("volumes/brain1_image.nrrd")
def test_3d_two_processes_equal_one_on_the_nrrd_volumes(tmp_path):
    """3D patches (global batch of 2 patches, one per process) on the two labelled NRRD brains.

    SGD, not AdamW: with instance norm a few weight gradients are sums that cancel to ~1e-8, where
    the order of additions changes their relative value by percents and Adam's g / (sqrt(v) + eps)
    turns that into a difference of a few percent of one learning-rate step (measured with AdamW:
    one weight of 432 off by 3.2e-5 after 4 steps, the others within 1e-5). SGD passes the
    gradients through unscaled, so the comparison checks the data-parallel gradients themselves."""
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["brain1"], "val": ["brain2"], "test": []}))
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--splits", str(splits), *TINY_3D]
    assert main(["-q", "train", str(VOLUMES), "--out", str(one), *flags]) == 0
    res = torchrun("train", str(VOLUMES), "--out", str(two), *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("model written to") == 1, res.stdout
    assert_same_run(one, two)
    assert json.loads((two / "model.json").read_text())["input"]["dim"] == 3


def test_resume_under_torchrun_continues_like_one_process(phantom_runs, phantoms, tmp_path):
    one, two = (shutil.copytree(d, tmp_path / d.name) for d in phantom_runs)
    before = (two / "metrics.csv").read_text()
    assert main(["-q", "train", str(phantoms), "--out", str(one), "--resume", "--epochs", "3", "--device", "cpu"]) == 0
    res = torchrun("train", str(phantoms), "--out", str(two), "--resume", "--epochs", "3", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (two / "metrics.csv").read_text().startswith(before)  # epochs 0-1 kept, not run again
    assert [r["epoch"] for r in _metrics(two / "metrics.csv")] == ["0", "1", "2"]
    assert _load(two / "checkpoint.pt")["step"] == 9
    assert_same_run(one, two)


def test_a_global_batch_that_does_not_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    distributed.check_batch(4, n_train=12)
    with pytest.raises(MedanomalyError, match="global batch and must divide evenly among the 2 processes; "
                                              "use --batch-size 4 or 2"):
        distributed.check_batch(3)
    with pytest.raises(MedanomalyError, match="3 slices, fewer than the global batch 4 .* use --batch-size 2"):
        distributed.check_batch(4, n_train=3)


def test_without_torchrun_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_from_env("cpu")
    assert (info.rank, info.world_size, info.device) == (0, 1, "cpu") and distributed.is_main()
    model = torch.nn.Linear(2, 1)
    assert distributed.data_parallel(model) is model and distributed.broadcast_object(3) == 3


def test_sharded_predict_writes_the_files_of_one_process(phantom_runs, phantoms, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(phantoms / "synthetic_case_04", inputs)
    (inputs / "broken.png").write_bytes(b"not a png")  # a failure in one shard is reported in input order
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["-q", "predict", str(phantom_runs[0]), str(inputs), "--out", str(one), "--device", "cpu"]) == 1
    res = torchrun("predict", str(phantom_runs[0]), str(inputs), "--out", str(two), "--device", "cpu")
    assert res.returncode != 0, res.stderr[-3000:]  # torchrun passes on the workers' exit code 1
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len(files) == 4 * 3 + 1  # mask, score map, overlay per image; regions.json
    for rel in files:
        assert (two / rel).read_bytes() == (one / rel).read_bytes(), rel
    regions = json.loads((one / "regions.json").read_text())
    assert [f["input"] for f in regions["failed"]] == [str(inputs / "broken.png")]
    assert res.stdout.count("images predicted into") == 1


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["evaluate", "--pred", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "under torchrun only 'train' and 'predict' are data parallel" in capsys.readouterr().err
