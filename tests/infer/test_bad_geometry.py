"""Bad input: a model file whose training-geometry record is damaged or names an orientation this
medanomaly does not use; predict refuses it in one line, touching nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage


def _world(tmp_path: Path, make_model_dir, geometry) -> tuple[Path, Path, Path]:
    model = make_model_dir(tmp_path / "model")
    data = json.loads((model / "model.json").read_text())
    data["geometry"] = geometry
    (model / "model.json").write_text(json.dumps(data))
    images = tmp_path / "images"
    images.mkdir()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint8)).save(images / "scan.png")
    return model, images, tmp_path / "out"


@pytest.mark.parametrize("geometry", [["L", "P", "S"], {"orientation": ["L", "P", "S"], "spacing_mm": [1, 1, 1]}])
def test_bad_geometry_record(tmp_path, make_model_dir, cli, geometry):
    model, images, out = _world(tmp_path, make_model_dir, geometry)
    cli.refuses("predict", model, images / "scan.png", "--out", out,
                says=r"model\.json is damaged or was edited \(geometry is .*expected an object with keys among "
                     r"orientation, median_spacing, slice_plane",
                untouched=(model, images))


def test_bad_geometry_orientation(tmp_path, make_model_dir, cli):
    model, images, out = _world(tmp_path, make_model_dir, {"orientation": ["R", "A", "S"]})
    cli.refuses("predict", model, images / "scan.png", "--out", out,
                says=r"geometry\.orientation is \['R', 'A', 'S'\]; this medanomaly trains and predicts in "
                     r"\['L', 'P', 'S'\] only",
                untouched=(model, images))
