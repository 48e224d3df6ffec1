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
    for name in ("model.pt", "model.json", "config.json", "splits.json", "metrics.csv", "checkpoint.pt"):
        assert (trained / name).is_file(), name
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
