"""CLI: predict writes a DICOM SEG for DICOM series (default), export and predict --runtime onnx."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medanomaly.apps.cli import main

pytest.importorskip("highdicom")
pytest.importorskip("onnxruntime")

from medanomaly.io.dicomseg import read_dicom_seg  # noqa: E402

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
SERIES = DATA / "dicom-series" / "mr-gre-fieldmap-axial"
pytestmark = pytest.mark.shared_data("dicom-series/mr-gre-fieldmap-axial")


def test_predict_dicom_seg_and_onnx_runtime(tmp_path, make_model_dir):
    model = make_model_dir(tmp_path / "model")
    meta = json.loads((model / "model.json").read_text())
    meta["postprocess"]["threshold"] = 0.5
    (model / "model.json").write_text(json.dumps(meta))
    assert main(["-q", "predict", str(model), str(SERIES), "--out", str(tmp_path / "torch"), "--device", "cpu"]) == 0
    stem = tmp_path / "torch" / SERIES.name
    mask = nib.load(f"{stem}_pred.nii.gz").get_fdata().transpose(2, 1, 0) > 0
    np.testing.assert_array_equal(read_dicom_seg(Path(f"{stem}_seg.dcm"), SERIES), mask)
    regions = json.loads((tmp_path / "torch" / "regions.json").read_text())
    assert regions["images"][0]["dicom_seg"] == f"{SERIES.name}_seg.dcm"
    # --no-dicom-seg: no SEG
    assert main(["-q", "predict", str(model), str(SERIES), "--out", str(tmp_path / "plain"), "--device", "cpu",
                 "--no-dicom-seg"]) == 0
    assert not list((tmp_path / "plain").glob("*_seg.dcm"))
    # ONNX: refused before export, then the same scores
    assert main(["-q", "predict", str(model), str(SERIES), "--out", str(tmp_path / "onnx"), "--runtime", "onnx"]) == 2
    assert main(["-q", "export", str(model), "--format", "onnx"]) == 0
    assert (model / "model.onnx").is_file() and (model / "model.onnx.json").is_file()
    assert main(["-q", "predict", str(model), str(SERIES), "--out", str(tmp_path / "onnx"), "--runtime", "onnx"]) == 0
    a = nib.load(f"{stem}_score.nii.gz").get_fdata()
    b = nib.load(tmp_path / "onnx" / f"{SERIES.name}_score.nii.gz").get_fdata()
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert main(["-q", "export", str(model), "--out", str(tmp_path / "x" / "m.onnx")]) == 0
    assert (tmp_path / "x" / "m.onnx.json").is_file()
