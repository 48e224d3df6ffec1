"""ONNX export: the file loads in ONNX Runtime and gives the PyTorch (fp32) results.

Tolerance: both runtimes in fp32, so outputs agree to float rounding; asserted atol 1e-4 on
probabilities, logits, reconstructions and anomaly maps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")  # torch.onnx.export (dynamo=False) needs it

from medanomaly.core.errors import MedanomalyError  # noqa: E402
from medanomaly.infer.export import export_onnx, sidecar_path  # noqa: E402
from medanomaly.infer.predictor import Predictor  # noqa: E402
from medanomaly.io import Geometry, Image, read_image  # noqa: E402
from medanomaly.postprocess.ops import PostprocessParams  # noqa: E402

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
LGG = DATA / "lgg-flair"
ATOL = 1e-4


def raster(array: np.ndarray, name: str = "x.png") -> Image:
    geo = Geometry("raster", (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False, meta={"dtype": "uint8"})
    return Image(np.ascontiguousarray(array, dtype=np.float32), geo, Path(name))


def test_export_writes_onnx_and_sidecar(exported_model):
    onnx_path = exported_model / "model.onnx"
    assert onnx_path.is_file() and sidecar_path(onnx_path).name == "model.onnx.json"
    doc = json.loads(sidecar_path(onnx_path).read_text())
    assert doc["format"] == "medanomaly-onnx" and doc["task"] == "supervised"
    assert doc["input"]["name"] == "image" and doc["input"]["shape"] == ["N", 1, 32, 32]
    assert doc["input"]["normalization"] == "auto" and "255" in doc["input"]["normalization_meaning"]
    assert "bilinear" in doc["input"]["resize"] and "antialias" in doc["input"]["resize"]
    assert doc["output"]["name"] == "logits" and "sigmoid" in doc["output"]["meaning"]
    assert doc["postprocess"] == PostprocessParams().to_dict()
    assert doc["onnx"]["check"]["max_abs_diff_vs_pytorch_fp32"] < ATOL
    assert len(doc["model_pt_sha256"]) == 64 and len(doc["onnx"]["sha256"]) == 64
    assert [p.name for p in exported_model.iterdir() if p.name.startswith(".tmp")] == []  # atomic writes


def test_runner_scores_equal_predictor(exported_model):
    """Full path (normalise, resize, network, resize back) on an 8-bit 2D image and a small volume."""
    runner, predictor = Predictor(exported_model, runtime="onnx"), Predictor(exported_model, "cpu")
    assert predictor.precision == "fp32"
    with torch.no_grad():  # the runner's torch network must be unused: break it
        for p in runner.model.parameters():
            p.fill_(float("nan"))
    rng = np.random.default_rng(0)
    for image in (raster(rng.integers(0, 256, (1, 50, 70))), raster(rng.random((1, 3, 40, 40)) * 900, "v.nii")):
        got, expected = runner.scores(image), predictor.scores(image)
        assert got.shape == image.spatial_shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(runner.predict(image).mask, predictor.predict(image).mask)


@pytest.mark.shared_data("lgg-flair")
def test_runner_equals_predictor_on_a_real_lgg_slice(exported_model):
    patient = sorted(p for p in LGG.iterdir() if p.is_dir())[0]
    slices = sorted(patient.glob("*_flair.png"), key=lambda p: int(p.stem.split("_")[-2]))
    path = slices[len(slices) // 2]  # a mid-brain slice
    image = read_image(path)
    got = Predictor(exported_model, runtime="onnx").scores(image)
    expected = Predictor(exported_model, "cpu").scores(image)
    assert got.shape == image.spatial_shape == (256, 256)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_anomaly_model_exports_reconstruction(tmp_path, make_model_dir):
    model_dir = make_model_dir(tmp_path / "anomaly", task="anomaly")
    out = export_onnx(model_dir, tmp_path / "elsewhere" / "net.onnx")
    assert out == tmp_path / "elsewhere" / "net.onnx" and not (model_dir / "model.onnx").exists()
    doc = json.loads((tmp_path / "elsewhere" / "net.onnx.json").read_text())
    assert doc["task"] == "anomaly" and doc["output"]["name"] == "reconstruction"
    assert doc["anomaly"]["method"] == "denoise"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["reconstruction"]
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = Predictor(model_dir, "cpu").model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=ATOL, rtol=0)
    # the anomaly map (residual, foreground, median filter) through ONNX equals the torch one
    yy, xx = np.mgrid[:48, :48]
    head = (((yy - 24) ** 2 + (xx - 24) ** 2) < 18**2) * (120 + np.random.default_rng(3).integers(0, 60, (48, 48)))
    image = raster(head[None])
    got = Predictor(model_dir, runtime="onnx", onnx_path=out).scores(image)
    np.testing.assert_allclose(got, Predictor(model_dir, "cpu").scores(image), atol=ATOL, rtol=0)
    assert got.shape == (48, 48) and got.max() > 0


def test_intensity_method_has_nothing_to_export(tmp_path, make_model_dir):
    model_dir = make_model_dir(tmp_path / "intensity", task="anomaly", method="intensity")
    with pytest.raises(MedanomalyError, match="nothing to export"):
        export_onnx(model_dir)
    assert not (model_dir / "model.onnx").exists()


def test_multichannel_and_padded_size(tmp_path, make_model_dir):
    """3 channels, size 40 with depth 3 (padded to 48 inside the network, cropped back)."""
    model_dir = make_model_dir(tmp_path / "rgb", in_channels=3, size=40, depth=3)
    export_onnx(model_dir)
    image = raster(np.random.default_rng(4).integers(0, 256, (3, 45, 37)))
    np.testing.assert_allclose(Predictor(model_dir, runtime="onnx").scores(image),
                               Predictor(model_dir, "cpu").scores(image), atol=ATOL, rtol=0)


def test_test_time_augmentation_is_kept_and_documented(tmp_path, make_model_dir):
    """model.json input.tta (left-right flip averaging): the runner does it through ONNX too."""
    model_dir = make_model_dir(tmp_path / "tta")
    meta = json.loads((model_dir / "model.json").read_text())
    meta["input"]["tta"] = True
    (model_dir / "model.json").write_text(json.dumps(meta))
    doc = json.loads(sidecar_path(export_onnx(model_dir)).read_text())
    assert doc["tta"] is True and "flip" in doc["score"]
    image = raster(np.random.default_rng(6).integers(0, 256, (1, 64, 64)))
    np.testing.assert_allclose(Predictor(model_dir, runtime="onnx").scores(image),
                               Predictor(model_dir, "cpu").scores(image), atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_other_norms_export(tmp_path, norm, make_model_dir):
    model_dir = make_model_dir(tmp_path / norm, norm=norm)
    export_onnx(model_dir)
    image = raster(np.random.default_rng(5).integers(0, 256, (1, 64, 64)))
    np.testing.assert_allclose(Predictor(model_dir, runtime="onnx").scores(image),
                               Predictor(model_dir, "cpu").scores(image), atol=ATOL, rtol=0)
