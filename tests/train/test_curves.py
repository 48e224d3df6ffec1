"""progress.png after every epoch (from metrics.csv) and TensorBoard scalars with --tensorboard."""

from __future__ import annotations

import importlib.util
import math

import pytest
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.train import curves
from medanomaly.train.checkpoint import append_metrics

ROWS = [{"epoch": e, "train_loss": 0.7 - 0.1 * e, "val_loss": 0.8 - 0.1 * e, "val_dice": math.nan if e == 0 else 0.3,
         "lr": 1e-3, "seconds": 1.0, "images_per_s": 10.0} for e in range(3)]


def test_progress_png_is_drawn_from_metrics_csv(tmp_path):
    for row in ROWS:
        append_metrics(tmp_path / "metrics.csv", row)
        curves.after_epoch(tmp_path, row)
    m = curves.read_metrics(tmp_path / "metrics.csv")
    assert m["epoch"] == [0.0, 1.0, 2.0] and math.isnan(m["val_dice"][0])
    with PILImage.open(tmp_path / "progress.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "progress.png"]  # atomic: no temp file


def test_a_plot_that_fails_is_a_warning_not_the_end_of_the_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(curves, "plot_progress", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    curves.after_epoch(tmp_path, ROWS[0])
    assert "disk full" in caplog.text


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MedanomalyError, match="pip install tensorboard"):
        curves.check_tensorboard()


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    for row in ROWS:
        curves.write_scalars(tmp_path, row)
    assert list((tmp_path / curves.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
