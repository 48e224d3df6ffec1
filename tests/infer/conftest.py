"""Fixtures of the prediction tests: a model directory exported to ONNX (tests/infer/test_export.py
and test_onnx_runtime.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medanomaly.infer.export import export_onnx


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory, make_model_dir) -> Path:
    """A supervised 2D model directory (random weights, size 32) exported to ONNX: ``model.onnx`` and
    its sidecar beside ``model.pt``. Skips the test where onnx or onnxruntime is not installed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")  # torch.onnx.export (dynamo=False) needs it
    model_dir = make_model_dir(tmp_path_factory.mktemp("sup") / "model")
    export_onnx(model_dir)
    return model_dir
