"""The ONNX Runtime backend: the network exported by :mod:`medanomaly.infer.export` (``model.onnx``
and its sidecar ``model.onnx.json``) run on the CPU in fp32 behind the same
:class:`~medanomaly.infer.backend.Backend` contract as the PyTorch network, so that
``Predictor(model_dir, runtime="onnx")`` equals ``Predictor(model_dir)`` up to float rounding.

The graph has one input ``image`` (N, C, size, size), or (N, C, *patch) for a 3D model, and one
output ``logits`` (supervised, anomaly method 'synthetic') or ``reconstruction`` (other anomaly
methods); the batch axis N is dynamic.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medanomaly.config.model_file import ModelFile
from medanomaly.core.atomic import file_sha256
from medanomaly.core.errors import MedanomalyError

INPUT_NAME = "image"
OUTPUT_NAMES = {"supervised": "logits", "anomaly": "reconstruction"}


def require(module: str) -> Any:
    """Import ``module`` (onnx, onnxruntime) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MedanomalyError(f"ONNX export and --runtime onnx need the '{module}' package: pip install {module} "
                              "(the version pinned in requirements.lock)") from exc


def sidecar_path(onnx_path: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    return onnx_path.with_name(onnx_path.name + ".json")


def network_input_shape(mf: ModelFile) -> list[int]:
    """The network input without the batch axis: [C, size, size], or [C, *patch] for a 3D model."""
    if mf.input.dim == 3:
        return [mf.input.channels, *map(int, mf.input.patch or ())]
    return [mf.input.channels, mf.input.size, mf.input.size]


def output_name(mf: ModelFile) -> str:
    """'logits' for a segmenting network (supervised, or anomaly method 'synthetic'), else 'reconstruction'."""
    if mf.anomaly is not None and mf.anomaly.method == "synthetic":
        return "logits"
    return OUTPUT_NAMES[mf.task]


def new_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on ``path`` using ``threads`` (default: torch's thread count)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise MedanomalyError(f"cannot load ONNX model {path} ({type(exc).__name__}: {exc}); "
                              "re-export it with 'medanomaly export'") from exc


def load_session(onnx_path: Path, model_dir: Path, mf: ModelFile, threads: int | None = None) -> Any:
    """A session on ``onnx_path``, checked against the model directory: exported from its
    ``model.pt`` (the sidecar's hash) and with the input and output its model file describes."""
    onnx_path, model_dir = Path(onnx_path), Path(model_dir)
    if not onnx_path.is_file():
        raise MedanomalyError(f"{onnx_path} does not exist; create it with 'medanomaly export "
                              f"{model_dir} --format onnx'")
    sidecar = sidecar_path(onnx_path)
    if sidecar.is_file():  # an export of other weights (retrained since) must not run silently
        try:
            exported_from = json.loads(sidecar.read_text()).get("model_pt_sha256")
        except ValueError:
            exported_from = None
        if exported_from and exported_from != file_sha256(model_dir / "model.pt"):
            raise MedanomalyError(f"{onnx_path} was exported from other weights than {model_dir}/model.pt "
                                  f"(retrained since?); re-export it with 'medanomaly export {model_dir}'")
    session = new_session(onnx_path, threads)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want, expected_output = network_input_shape(mf), output_name(mf)
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != want or [o.name for o in outputs] != [expected_output]:
        raise MedanomalyError(f"{onnx_path} (input {[i.shape for i in inputs]}, outputs {[o.name for o in outputs]}) "
                              f"does not match {model_dir}/model.json (input [N, {', '.join(map(str, want))}], "
                              f"output {expected_output}); re-export it with 'medanomaly export'")
    return session


class OnnxBackend:
    """An ONNX Runtime session as a :class:`~medanomaly.infer.backend.Backend` (always fp32)."""

    def __init__(self, session: Any):
        self.session, self.precision = session, "fp32"
        self._name = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self._name: arr})[0])
