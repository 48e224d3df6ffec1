"""Resilience: a training run SIGKILLed in the middle of an epoch resumes with at most that epoch
lost, and untrusted or damaged model files are refused with a clear error (no code from a
model.pt is ever run), on a few real LGG slices copied into tmp_path."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import medanomaly
from medanomaly.apps.cli import main
from medanomaly.config.model_file import read_model_file
from medanomaly.config.options import NORMALIZATIONS
from medanomaly.train.checkpoint import METRIC_FIELDS

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
LGG = DATA / "lgg-flair"
pytestmark = pytest.mark.shared_data("lgg-flair")  # these tests train on a few of its slices

# every slice of the two train patients (so an epoch lasts long enough to be killed inside it), 4 of the others
PATIENTS = {"train": ["TCGA_CS_4941_19960909", "TCGA_CS_4943_20000902"], "val": ["TCGA_CS_5395_19981004"],
            "test": ["TCGA_CS_5396_20010302"]}
TINY = ["--size", "32", "--width", "4", "--depth", "2", "--batch-size", "2", "--device", "cpu"]
EPOCHS = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def lgg(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lgg")
    for split, patients in PATIENTS.items():
        for p in patients:
            masks = sorted((LGG / p).glob("*_mask.png"))
            mid = len(masks) // 2
            (root / p).mkdir()
            for m in (masks if split == "train" else masks[mid - 2:mid + 2]):
                for f in (m, m.with_name(m.name.replace("_mask.png", "_flair.png"))):
                    shutil.copy(f, root / p / f.name)
    (root / "splits.json").write_text(json.dumps(PATIENTS))
    return root


@pytest.fixture(scope="module")
def model(lgg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["-q", "train", str(lgg), "--out", str(out), "--epochs", "1", *TINY]) == 0
    return out


def _n_train(lgg: Path) -> int:
    return sum(len(list((lgg / p).glob("*_mask.png"))) for p in PATIENTS["train"])


def _rows(metrics: Path) -> list[str]:
    """Complete data rows of metrics.csv (a row being appended right now is left out)."""
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return []
    return [ln + "\n" for ln in text.split("\n")[1:-1]]


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns  # os.replace gives a new inode; the mtime is the write's


def _wait(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) while waiting for {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def _load(path: Path) -> object:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_loses_at_most_that_epoch(lgg, tmp_path):
    run = tmp_path / "run"
    metrics, ckpt = run / "metrics.csv", run / "checkpoint.pt"
    cmd = [sys.executable, "-m", "medanomaly", "-q", "train", str(lgg), "--out", str(run), "--epochs", str(EPOCHS), *TINY]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: len(_rows(metrics)) >= 2 and ckpt.exists(), proc, 90, "2 epochs in metrics.csv")
        seen = _stamp(ckpt)
        _wait(lambda: _stamp(ckpt) != seen, proc, 60, "the next checkpoint")  # an epoch just ended
        epoch_s = sorted(float(r.split(",")[METRIC_FIELDS.index("seconds")]) for r in _rows(metrics))
        time.sleep(0.3 * epoch_s[len(epoch_s) // 2])  # about a third into the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"

    # what the killed run left: complete files only (an interrupted atomic write is a .tmp-* file)
    names = {p.name for p in run.iterdir() if not p.name.startswith(".tmp-")}
    assert names == {"checkpoint.pt", "config.json", "splits.json", "metrics.csv", "model.pt", "train.log",
                     "progress.png"}, names
    json.loads((run / "config.json").read_text())
    assert json.loads((run / "splits.json").read_text()) == PATIENTS
    state, best = _load(ckpt), _load(run / "model.pt")
    assert all(isinstance(v, torch.Tensor) for v in best.values())
    last = state["epoch"]
    assert 1 <= last < EPOCHS - 1
    rows = _rows(metrics)
    # killed inside epoch last+1 (or between its metrics row and its checkpoint)
    assert [int(r.split(",")[0]) for r in rows] in (list(range(last + 1)), list(range(last + 2)))
    kept = rows[:last + 1]
    # a leftover of a write cut off by a kill (the real one above leaves one only by chance)
    (run / ".tmp-checkpoint-x1y2z3.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])

    res = subprocess.run([sys.executable, "-m", "medanomaly", "-q", "train", str(lgg), "--out", str(run), "--resume",
                          "--device", "cpu"], env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert not list(run.glob(".tmp-*")), "stale temporary files left in the run folder"
    rows = _rows(metrics)
    assert [int(r.split(",")[0]) for r in rows] == list(range(EPOCHS))  # each epoch exactly once
    assert rows[:last + 1] == kept  # epochs up to the checkpoint were not run again
    assert all(len(r.split(",")) == len(METRIC_FIELDS) for r in rows)
    final = _load(ckpt)
    assert final["epoch"] == EPOCHS - 1
    assert final["step"] == EPOCHS * (_n_train(lgg) // 2)  # the killed epoch's steps were not counted
    assert read_model_file(run).training.best_epoch == final["best_epoch"]


def test_cut_off_metrics_row_is_dropped_on_resume(model, lgg, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model, run)
    (run / "model.json").unlink()  # as if killed before calibration
    with (run / "metrics.csv").open("a", newline="") as fh:
        fh.write("0,0.6")  # an append cut off by a kill whose first digits look like a kept epoch ('1' of '12,...')
    assert main(["-q", "train", str(lgg), "--out", str(run), "--resume", "--epochs", "2", "--device", "cpu"]) == 0
    assert [int(r.split(",")[0]) for r in _rows(run / "metrics.csv")] == [0, 1]


def test_fresh_start_in_an_interrupted_run_folder_restarts_its_history(model, lgg, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(model, run)
    (run / "model.json").unlink()
    (run / ".tmp-model-abc.pt").write_bytes(b"half a file")
    assert main(["-q", "train", str(lgg), "--out", str(run), "--epochs", "1", *TINY]) == 0
    assert [int(r.split(",")[0]) for r in _rows(run / "metrics.csv")] == [0]
    assert not list(run.glob(".tmp-*"))


# --- untrusted model files -----------------------------------------------------------------------

class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _predict(capsys, model_dir: Path, lgg: Path, out: Path) -> tuple[int, str]:
    rc = main(["-q", "predict", str(model_dir), str(lgg / PATIENTS["test"][0]), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    return rc, err.replace("\n  ", " ")  # undo the CLI's line wrapping


def _copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    return dst


def test_model_json_records_version_and_input_spec(model):
    meta = json.loads((model / "model.json").read_text())
    assert meta["format"] == "medanomaly-model"
    assert meta["medanomaly_version"] == medanomaly.__version__
    assert meta["task"] == "supervised"
    assert meta["input"]["channels"] == meta["model"]["in_channels"] == 1
    assert meta["input"]["size"] == 32
    assert meta["input"]["normalization"] in NORMALIZATIONS
    assert meta["model"]["width"] == 4 and meta["model"]["depth"] == 2


def test_intact_model_predicts(model, lgg, tmp_path, capsys):
    rc, err = _predict(capsys, model, lgg, tmp_path / "out")
    assert rc == 0, err
    assert (tmp_path / "out" / "regions.json").is_file()


def test_truncated_weights_are_refused_naming_the_file(model, lgg, tmp_path, capsys):
    m = _copy(model, tmp_path)
    data = (m / "model.pt").read_bytes()
    (m / "model.pt").write_bytes(data[: len(data) // 2])
    rc, err = _predict(capsys, m, lgg, tmp_path / "out")
    assert rc == 2
    assert str(m / "model.pt") in err and "truncated or damaged" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_weights_that_would_run_code_are_refused_without_running_it(container, model, lgg, tmp_path, capsys):
    m, marker = _copy(model, tmp_path), tmp_path / "pwned"
    state = {k: v for k, v in _load(model / "model.pt").items()}
    state["evil"] = _Payload(marker)
    if container == "pickle":
        (m / "model.pt").write_bytes(pickle.dumps(state))
        control = tmp_path / "control"
        pickle.loads(pickle.dumps(_Payload(control)))  # the payload is live: plain unpickling runs it
        assert control.exists()
    else:
        torch.save(state, m / "model.pt")
    rc, err = _predict(capsys, m, lgg, tmp_path / "out")
    assert not marker.exists(), "loading model.pt ran code from it"
    assert rc == 2
    assert f"refused to load {m / 'model.pt'}" in err and "not a plain weights file" in err
    assert "weights_only" not in err  # no advice to turn the protection off


@pytest.mark.parametrize("edit, expected", [
    ({"input.channels": 3, "model.in_channels": 3}, "do not fit the network described in"),
    ({"input.channels": 3}, "input.channels is 3 but model.in_channels is 1"),
    ({"model.out_channels": 2}, "model.out_channels is 2"),
    ({"model.width": 8}, "do not fit the network described in"),
])
def test_model_json_that_does_not_match_the_weights_is_a_clear_error(edit, expected, model, lgg, tmp_path, capsys):
    m = _copy(model, tmp_path)
    meta = json.loads((m / "model.json").read_text())
    for key, value in edit.items():
        section, name = key.split(".")
        meta[section][name] = value
    (m / "model.json").write_text(json.dumps(meta))
    rc, err = _predict(capsys, m, lgg, tmp_path / "out")
    assert rc == 2
    assert expected in err and str(m / "model.json") in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda meta, text: text[: len(text) // 2], "is not valid JSON"),
    (lambda meta, text: json.dumps({**meta, "format": "onnx-sidecar"}), "format 'onnx-sidecar'"),
    (lambda meta, text: json.dumps({k: v for k, v in meta.items() if k != "format"}), "format None"),
    (lambda meta, text: json.dumps([meta]), "format 'list'"),
    (lambda meta, text: json.dumps({k: v for k, v in meta.items() if k != "postprocess"}), "missing entry 'postprocess'"),
    (lambda meta, text: json.dumps({**meta, "model": {**meta["model"], "wdith": 4}}), "is damaged or was edited"),
    (lambda meta, text: json.dumps({**meta, "postprocess": {**meta["postprocess"], "treshold": 0.5}}), "treshold"),
], ids=["truncated", "wrong-format", "no-format", "not-an-object", "missing-key", "unknown-model-key",
        "unknown-postprocess-key"])
def test_damaged_model_json_is_a_clear_error(damage, expected, model, lgg, tmp_path, capsys):
    m = _copy(model, tmp_path)
    text = (m / "model.json").read_text()
    (m / "model.json").write_text(damage(json.loads(text), text))
    rc, err = _predict(capsys, m, lgg, tmp_path / "out")
    assert rc == 2
    assert expected in err and str(m / "model.json") in err, err
