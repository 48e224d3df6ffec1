"""End-to-end CLI: train -> predict -> evaluate on a few real LGG slices, and the error paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.apps.cli import main

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
LGG = DATA / "lgg-flair"
needs_lgg = pytest.mark.shared_data("lgg-flair")

PATIENTS = {"train": ["TCGA_CS_4941_19960909", "TCGA_CS_4943_20000902", "TCGA_CS_4944_20010208"],
            "val": ["TCGA_CS_5395_19981004"], "test": ["TCGA_CS_5396_20010302"]}


def _tumour_slices(patient: str, n: int) -> list[Path]:
    """n slices of a patient, most with tumour (so a few seconds of training learn something)."""
    masks = sorted((LGG / patient).glob("*_mask.png"))
    with_lesion = [m for m in masks if np.asarray(PILImage.open(m)).any()]
    without = [m for m in masks if m not in with_lesion]
    return (with_lesion[::max(1, len(with_lesion) // (n - 1))][: n - 1] + without[:1])[:n]


@pytest.fixture(scope="module")
def lgg_small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lgg small")  # a space in the path on purpose
    for patients in PATIENTS.values():
        for p in patients:
            (root / p).mkdir()
            for m in _tumour_slices(p, 6):
                shutil.copy(m, root / p / m.name)
                img = m.with_name(m.name.replace("_mask.png", "_flair.png"))
                shutil.copy(img, root / p / img.name)
    (root / "splits.json").write_text(json.dumps(PATIENTS))
    return root


@pytest.fixture(scope="module")
def trained(lgg_small, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("model") / "m"
    rc = main(["-q", "train", str(lgg_small), "--out", str(model), "--size", "64", "--width", "8", "--depth", "3",
               "--epochs", "3", "--batch-size", "8", "--max-minutes", "1", "--device", "cpu"])
    assert rc == 0
    return model


@needs_lgg
def test_train_writes_model_directory(trained):
    for name in ("model.pt", "model.json", "config.json", "splits.json", "metrics.csv", "checkpoint.pt", "train.log",
                 "progress.png"):
        assert (trained / name).is_file(), name
    log = (trained / "train.log").read_text()  # INFO lines although the run was -q (the console's setting)
    assert "INFO medanomaly.train.loop: epoch 2:" in log and "\r" not in log
    assert "medanomaly.apps.api: time: training" in log  # the calibration's lines too
    meta = json.loads((trained / "model.json").read_text())
    assert meta["calibration"]["split"] == "val"
    assert set(meta["postprocess"]) >= {"threshold", "min_size", "fill_holes", "smooth_radius"}
    rows = (trained / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss,val_dice") and len(rows) == 4


@needs_lgg
def test_resume_continues_after_last_epoch(trained, lgg_small, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    rc = main(["-q", "train", str(lgg_small), "--out", str(run), "--resume", "--epochs", "4", "--device", "cpu"])
    assert rc == 0
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]


@needs_lgg
def test_predict_then_evaluate_reproduce_each_other(trained, lgg_small, tmp_path):
    test_dir = lgg_small / PATIENTS["test"][0]
    out = tmp_path / "pred"
    assert main(["-q", "predict", str(trained), str(test_dir), "--out", str(out), "--device", "cpu"]) == 0
    images = sorted(test_dir.glob("*_flair.png"))
    for img in images:
        stem = img.name[: -len(".png")]
        pred = np.asarray(PILImage.open(out / f"{stem}_pred.png"))
        assert pred.shape == (256, 256) and set(np.unique(pred)) <= {0, 255}
        assert (out / f"{stem}_score.tif").is_file() and (out / f"{stem}_overlay.png").is_file()
    regions = json.loads((out / "regions.json").read_text())
    assert len(regions["images"]) == len(images) and regions["failed"] == []

    ev = tmp_path / "eval"
    assert main(["-q", "evaluate", "--model", str(trained), "--data", str(lgg_small), "--out", str(ev),
                 "--device", "cpu"]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    for key in ("n_cases", "dice", "iou", "sensitivity", "specificity", "precision", "f1", "auroc", "auprc",
                "dice_per_case_mean", "lesion_sensitivity", "lesion_precision", "lesion_f1"):
        assert key in summary, key
    assert summary["n_cases"] == 1 and summary["split"] == "test"
    assert (ev / "cases.csv").is_file() and (ev / "report.html").is_file()
    # evaluate's predictions are byte-for-byte what predict wrote
    for img in images:
        stem = img.name[: -len(".png")]
        a = np.asarray(PILImage.open(out / f"{stem}_pred.png"))
        b = np.asarray(PILImage.open(ev / "predictions" / PATIENTS["test"][0] / f"{stem}_pred.png"))
        assert np.array_equal(a, b)
    # scoring the written predictions gives the same numbers
    ev2 = tmp_path / "eval2"
    assert main(["-q", "evaluate", "--pred", str(ev / "predictions"), "--data", str(lgg_small), "--split", "test",
                 "--out", str(ev2)]) == 0
    s2 = json.loads((ev2 / "summary.json").read_text())
    assert s2["dice"] == pytest.approx(summary["dice"]) and s2["auprc"] == pytest.approx(summary["auprc"], abs=1e-6)


@needs_lgg
def test_predict_refuses_output_inside_input_and_overwrite(trained, lgg_small, tmp_path, capsys):
    assert main(["-q", "predict", str(trained), str(lgg_small), "--out", str(lgg_small / "out")]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert not (lgg_small / "out").exists()
    out = tmp_path / "p"
    one = next((lgg_small / PATIENTS["test"][0]).glob("*_flair.png"))
    assert main(["-q", "predict", str(trained), str(one), "--out", str(out)]) == 0
    assert main(["-q", "predict", str(trained), str(one), "--out", str(out)]) == 2
    assert main(["-q", "predict", str(trained), str(one), "--out", str(out), "--overwrite"]) == 0


@needs_lgg
def test_predict_keeps_going_past_a_bad_file(trained, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    good = next((LGG / PATIENTS["test"][0]).glob("*_flair.png"))
    shutil.copy(good, src / "good.png")
    (src / "bad.png").write_bytes(b"not a png at all")
    assert main(["-q", "predict", str(trained), str(src), "--out", str(tmp_path / "o")]) == 1
    assert (tmp_path / "o" / "good_pred.png").is_file() and not (tmp_path / "o" / "bad_pred.png").exists()
    assert "bad.png" in capsys.readouterr().err


def test_train_without_masks_is_a_clear_error(tmp_path, capsys):
    for i in range(3):
        PILImage.fromarray(np.full((16, 16), i * 40, np.uint8)).save(tmp_path / f"img{i}.png")
    rc = main(["-q", "train", str(tmp_path), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "no image/mask pairs" in err and "Traceback" not in err


def test_missing_data_folder_exit_code_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "medanomaly", "train", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "m")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_end_to_end_on_synthetic_phantoms(tmp_path):
    from medanomaly.apps.demo import run_demo

    summary = run_demo(tmp_path / "demo", max_minutes=0.15, progress=False)
    html = (tmp_path / "demo" / "eval" / "report.html").read_text()
    assert "SYNTHETIC" in html
    assert 0.0 <= summary["dice_per_case_mean"] <= 1.0


@needs_lgg
def test_every_json_file_of_a_run_is_strict_json(trained, lgg_small, tmp_path):
    """summary.json, model.json, config.json, plan.json, splits.json, regions.json: no NaN/Infinity."""
    from medanomaly.core.jsonio import loads_strict

    assert main(["-q", "evaluate", "--model", str(trained), "--data", str(lgg_small), "--out", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    test_dir = lgg_small / PATIENTS["test"][0]
    assert main(["-q", "predict", str(trained), str(test_dir), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    files = [*trained.glob("*.json"), *(tmp_path / "ev").glob("*.json"), tmp_path / "pred" / "regions.json"]
    assert {"model.json", "config.json", "splits.json", "summary.json", "regions.json"} <= {f.name for f in files}
    for f in files:
        loads_strict(f.read_text())  # raises on NaN / Infinity


@needs_lgg
def test_a_run_logged_to_a_file_has_few_lines(lgg_small, tmp_path):
    """stderr to a file (not a terminal): plain log lines, no progress-bar redraws (issue 14: one epoch wrote
    936 lines, 458 of them 'loading:')."""
    out = tmp_path / "m"
    with (tmp_path / "log").open("w") as err:
        proc = subprocess.run([sys.executable, "-m", "medanomaly", "train", str(lgg_small), "--out", str(out),
                               "--no-plan", "--size", "32", "--width", "4", "--depth", "2", "--epochs", "1",
                               "--batch-size", "4", "--device", "cpu"], stderr=err, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    log = (tmp_path / "log").read_text()
    assert proc.returncode == 0, log
    assert "\r" not in log and "|" not in log and len(log.splitlines()) < 20, log
    assert "epoch 0:" in log and (out / "train.log").is_file() and (out / "progress.png").is_file()


@pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial")
def test_most_verbose_predict_logs_no_dicom_identifier(trained, tmp_path, capsys, caplog):
    """-v (the most verbose setting) with a DICOM SEG written: the libraries' own INFO/DEBUG lines (highdicom
    names the SOP Instance UIDs it references) stay off, so no UID or patient identifier reaches the log."""
    import logging

    import pydicom

    series = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.glob("*.dcm"))]
    needles = {str(h.SOPInstanceUID) for h in headers} | {str(headers[0].SeriesInstanceUID),
                                                           str(headers[0].StudyInstanceUID), str(headers[0].PatientID)}
    with caplog.at_level(logging.DEBUG):
        rc = main(["-v", "predict", str(trained), str(series), "--out", str(tmp_path / "out"), "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert list((tmp_path / "out").rglob("*_seg.dcm")), "no DICOM SEG written"
    assert any(r.levelno == logging.DEBUG or r.name.startswith("medanomaly") for r in caplog.records)
    text = "\n".join([cap.out, cap.err, caplog.text, *(str(r.args) for r in caplog.records)])
    assert not [n for n in needles if n and n in text]
