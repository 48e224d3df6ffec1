"""Tests for medanomaly.infer.onnx_runtime: the exported graph run by ONNX Runtime behind the backend
contract (equal to the fp32 PyTorch network), the checks of an ONNX file against its model directory
(missing, foreign, stale), and the helpers naming the graph's input and output."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")  # torch.onnx.export (dynamo=False) needs it

from medanomaly.config.model_file import read_model_file  # noqa: E402
from medanomaly.core.atomic import file_sha256  # noqa: E402
from medanomaly.core.errors import MedanomalyError  # noqa: E402
from medanomaly.infer.export import export_onnx  # noqa: E402
from medanomaly.infer.onnx_runtime import (  # noqa: E402
    OnnxBackend,
    load_session,
    network_input_shape,
    new_session,
    output_name,
    require,
    sidecar_path,
)
from medanomaly.infer.predictor import Predictor  # noqa: E402

ATOL = 1e-4  # both runtimes in fp32: outputs agree to float rounding


def test_onnx_equals_torch_on_random_batches(exported_model):
    """Dynamic batch axis; logits and probabilities equal the fp32 PyTorch network's."""
    session = ort.InferenceSession(str(exported_model / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(float)", [1, 32, 32])
    assert out.name == "logits"
    net = Predictor(exported_model, "cpu").model
    forward = OnnxBackend(session)
    gen = torch.Generator().manual_seed(1)
    for n in (1, 5):
        x = torch.rand(n, 1, 32, 32, generator=gen)
        with torch.no_grad():
            expected = net(x)
        got = forward(x)
        assert got.shape == (n, 1, 32, 32) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(torch.sigmoid(got).numpy(), torch.sigmoid(expected).numpy(), atol=ATOL, rtol=0)


def test_the_backend_is_fp32_and_takes_any_float_tensor(exported_model):
    backend = OnnxBackend(new_session(exported_model / "model.onnx", threads=1))
    assert backend.precision == "fp32"
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    reference = backend(x.float())
    torch.testing.assert_close(backend(x), reference)  # float64 is sent as float32
    wide = torch.rand(2, 1, 32, 64)[..., ::2]  # not contiguous
    torch.testing.assert_close(backend(wide), backend(wide.contiguous()))


def test_runner_refuses_a_missing_foreign_or_stale_onnx(tmp_path, exported_model, make_model_dir):
    model_dir = make_model_dir(tmp_path / "other", size=48)
    with pytest.raises(MedanomalyError, match="medanomaly export"):
        Predictor(model_dir, runtime="onnx")
    with pytest.raises(MedanomalyError, match="does not match"):
        Predictor(model_dir, runtime="onnx", onnx_path=exported_model / "model.onnx")  # exported for size 32
    export_onnx(model_dir)
    Predictor(model_dir, runtime="onnx")
    make_model_dir(model_dir, size=48, seed=1)  # retrained into the same folder: model.onnx is stale
    with pytest.raises(MedanomalyError, match="re-export"):
        Predictor(model_dir, runtime="onnx")


def test_load_session_checks_the_file_against_the_model_directory(tmp_path, exported_model):
    mf = read_model_file(exported_model)
    onnx_path = exported_model / "model.onnx"
    session = load_session(onnx_path, exported_model, mf, threads=1)
    assert [i.name for i in session.get_inputs()] == ["image"]
    with pytest.raises(MedanomalyError, match=r"absent\.onnx does not exist; create it with 'medanomaly export"):
        load_session(tmp_path / "absent.onnx", exported_model, mf)
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(MedanomalyError, match=r"cannot load ONNX model .*junk\.onnx.*re-export"):
        load_session(tmp_path / "junk.onnx", exported_model, mf)
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(onnx_path.read_bytes())
    sidecar_path(copy).write_text("{not json")  # an unreadable sidecar is no reason to refuse the graph
    load_session(copy, exported_model, mf)
    sidecar_path(copy).write_text(json.dumps({"model_pt_sha256": "0" * 64}))
    with pytest.raises(MedanomalyError, match="exported from other weights"):
        load_session(copy, exported_model, mf)


def test_names_and_shapes_of_the_graph(tmp_path, make_model_dir, make_model_dir_3d):
    sup = read_model_file(make_model_dir(tmp_path / "sup", in_channels=3, size=40, depth=3))
    assert network_input_shape(sup) == [3, 40, 40] and output_name(sup) == "logits"
    denoise = read_model_file(make_model_dir(tmp_path / "den", task="anomaly"))
    assert output_name(denoise) == "reconstruction"
    synthetic = read_model_file(make_model_dir(tmp_path / "syn", task="anomaly", method="synthetic"))
    assert output_name(synthetic) == "logits"  # a segmenting network, although the task is anomaly
    vol = read_model_file(make_model_dir_3d(tmp_path / "3d", patch=(8, 16, 24)))
    assert network_input_shape(vol) == [1, 8, 16, 24]


def test_file_helpers(tmp_path):
    assert sidecar_path(tmp_path / "net.onnx") == tmp_path / "net.onnx.json"
    data = bytes(range(256)) * 5000  # 1.28 MB: read in two 1 MiB blocks
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    assert require("json") is json
    with pytest.raises(MedanomalyError, match="need the 'no_such_module_xyz' package: pip install no_such_module_xyz"):
        require("no_such_module_xyz")
