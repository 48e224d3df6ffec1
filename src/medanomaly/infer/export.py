"""Export a model directory's network to ONNX, and run it with ONNX Runtime behind the same
``scores`` contract as :class:`medanomaly.infer.predictor.Predictor`.

What is exported is the network only, in fp32, channels first (NCHW), with a dynamic batch axis:

- input ``image``: (N, C, size, size) float32, the image normalised and resized as predict does
  (described in the JSON sidecar ``<model>.onnx.json``); for a 3D model (N, C, *patch), patches of
  the volume resampled to the training spacing, scored by Gaussian-weighted sliding windows;
- output ``logits`` (supervised task: ``sigmoid(logits)`` is the lesion probability) or
  ``reconstruction`` (anomaly task: the network's normal-looking version of the input).

Pre-processing (normalisation, slicing of volumes, resizing) and post-processing (anomaly map,
resizing back, threshold, component filtering) stay outside the ONNX graph: the sidecar documents
them for other runtimes, and :class:`OnnxRunner` reuses medanomaly's own code for them, so that
``OnnxRunner(model_dir).scores(image)`` equals ``Predictor(model_dir).scores(image)`` up to
floating-point rounding (both fp32; a Predictor running in bf16 differs by bf16 rounding).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medanomaly.core.atomic import atomic_path, atomic_write_text
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__
from medanomaly.infer.predictor import Prediction, Predictor
from medanomaly.infer.volume import OVERLAP
from medanomaly.io import Image

INPUT_NAME = "image"
OUTPUT_NAMES = {"supervised": "logits", "anomaly": "reconstruction"}
#: largest difference between ONNX Runtime and PyTorch (fp32) tolerated by the check at export
VERIFY_ATOL = 1e-3

NORMALIZATION_MEANING = {
    "auto": "decided per image: 8-bit raster images (stored as uint8) are divided by 255; DICOM images "
            "with values below -500 (CT in HU) use 'ct'; anything else uses 'percentile'",
    "percentile": "per channel, (x - p0.5) / (p99.5 - p0.5) clipped to [0, 1], the 0.5th and 99.5th "
                  "percentiles taken over the whole image (the whole volume for a volume); a constant "
                  "channel becomes 0",
    "ct": "clip((x + 1000) / 2000, 0, 1) with x in Hounsfield units (window -1000..1000 HU)",
    "none": "values as read (DICOM rescaled to modality units), unchanged",
}


def _require(module: str) -> Any:
    """Import ``module`` (onnx, onnxruntime) or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MedanomalyError(f"ONNX export and --runtime onnx need the '{module}' package: pip install {module} "
                              "(the version pinned in requirements.lock)") from exc


def sidecar_path(onnx_path: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    return onnx_path.with_name(onnx_path.name + ".json")


def export_onnx(model_dir: Path, out_path: Path | None = None, opset: int = 17) -> Path:
    """Export the network of ``model_dir`` to ONNX (``out_path``, default ``model_dir/model.onnx``)
    and write the sidecar ``<out_path>.json``; return ``out_path``.

    fp32, eval mode, NCHW input ``image`` of shape (N, channels, size, size) (3D models: NCDHW,
    (N, channels, *patch)) with a dynamic batch axis N; output ``logits`` (supervised) or
    ``reconstruction`` (anomaly). Both files are written atomically. After export, ONNX Runtime is run on two random images and compared with the
    PyTorch network (fp32): a difference above :data:`VERIFY_ATOL` is an error; the value found is
    recorded in the sidecar. Raises :class:`MedanomalyError` for a model without a network (the
    'intensity' anomaly method) and for anything that stops the export.
    """
    model_dir = Path(model_dir)
    predictor = Predictor(model_dir, "cpu")
    if predictor.model is None:
        method = predictor.anomaly.method if predictor.anomaly else "?"
        raise MedanomalyError(f"{model_dir} uses the '{method}' anomaly method, which has no network: "
                              "nothing to export (its score is the normalised intensity itself)")
    if not isinstance(opset, int) or not 13 <= opset <= 20:
        raise MedanomalyError(f"ONNX opset {opset!r} is not supported; use 13..20 (default 17)")
    _require("onnx")  # torch.onnx.export (dynamo=False) serialises through it
    _require("onnxruntime")  # the check after export
    out_path = Path(out_path) if out_path is not None else model_dir / "model.onnx"
    output_name = output_name_of(predictor)
    model = predictor.model.float().to(memory_format=torch.contiguous_format).eval()
    example = torch.zeros(2, *input_shape(predictor))
    with atomic_path(out_path) as tmp:
        _torch_export(model, example, tmp, output_name, opset)
        max_diff = _verify(model, tmp, input_shape(predictor))
        digest = _sha256(tmp)
    sidecar = describe(predictor, out_path, opset, output_name, digest, max_diff)
    atomic_write_text(sidecar_path(out_path), json.dumps(sidecar, indent=2))
    return out_path


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path, output_name: str, opset: int) -> None:
    """The TorchScript-based exporter (dynamo=False): the traced graph of a fixed-size input."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the legacy exporter announces its deprecation; shape checks in the padding code are
            # traced as constants, which is right: the spatial size is fixed at export
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            # instance norm without running statistics uses the input's statistics in eval mode too
            warnings.filterwarnings("ignore", message=".*'instance_norm' is set to train=True.*")
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[output_name],
                              opset_version=opset, dynamic_axes={INPUT_NAME: {0: "N"}, output_name: {0: "N"}},
                              dynamo=False)
    except MedanomalyError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter errors become one user-facing error
        raise MedanomalyError(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def new_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path`` using ``threads`` (default: torch's thread count)."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise MedanomalyError(f"cannot load ONNX model {path} ({type(exc).__name__}: {exc}); "
                              "re-export it with 'medanomaly export'") from exc


def input_shape(predictor: Predictor) -> list[int]:
    """The network input without the batch axis: [C, size, size], or [C, *patch] for a 3D model."""
    if predictor.dim == 3:
        return [predictor.channels, *map(int, predictor.patch)]
    return [predictor.channels, predictor.size, predictor.size]


def _verify(model: torch.nn.Module, path: Path, shape: list[int]) -> float:
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = new_session(path).run(None, {INPUT_NAME: x.numpy()})
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= VERIFY_ATOL:
        raise MedanomalyError(f"the exported ONNX model differs from the PyTorch network by {diff:.3g} "
                              f"(> {VERIFY_ATOL}); the export is wrong: report it")
    return diff


_MAP_TAIL = (", set to zero outside the foreground (Otsu threshold, largest components, holes filled, eroded by "
             "anomaly.erode pixels), median filtered (anomaly.median_size) at the model size, then resized back "
             "to the image's size (bilinear, align_corners=False, no antialiasing)")


def output_name_of(predictor: Predictor) -> str:
    """'logits' for a segmenting network (supervised, or anomaly method 'synthetic'), else 'reconstruction'."""
    if predictor.task == "anomaly" and predictor.anomaly is not None and predictor.anomaly.method == "synthetic":
        return "logits"
    return OUTPUT_NAMES[predictor.task]


def describe(predictor: Predictor, onnx_path: Path, opset: int, output_name: str, sha256: str,
             max_diff: float) -> dict[str, Any]:
    """The sidecar: everything another runtime needs to reproduce ``Predictor.scores``."""
    meta, c, s = predictor.meta, predictor.channels, predictor.size
    supervised = predictor.task == "supervised"
    tta = bool(meta["input"].get("tta", False)) and supervised
    segmenter = output_name == "logits"  # supervised, or the anomaly method 'synthetic'
    out_channels = 1 if segmenter else c
    doc: dict[str, Any] = {
        "format": "medanomaly-onnx",
        "medanomaly_version": __version__,
        "model_medanomaly_version": meta.get("medanomaly_version"),
        "task": predictor.task,
        "model_pt_sha256": _sha256(predictor.model_dir / "model.pt"),
        "onnx": {"file": onnx_path.name, "sha256": sha256, "opset": opset, "precision": "fp32",
                 "exporter": f"torch {torch.__version__} (TorchScript-based, dynamo=False)",
                 "check": {"max_abs_diff_vs_pytorch_fp32": max_diff, "inputs": "2 random images"}},
        "input": {
            "name": INPUT_NAME, "shape": ["N", c, s, s], "dtype": "float32", "layout": "NCHW (channels first)",
            "channels": c, "size": s,
            "normalization": predictor.normalization,
            "normalization_meaning": NORMALIZATION_MEANING.get(predictor.normalization, ""),
            "slicing": "2D images (C, H, W) are one input; volumes (C, Z, Y, X) are cut into Z slices "
                       "(C, Y, X) along the first spatial axis, normalised as a whole volume first",
            "resize": f"bilinear to {s} x {s}, antialiased when shrinking (torch.nn.functional.interpolate("
                      "mode='bilinear', align_corners=False, antialias=True)); no resize if already that size",
        },
        "output": {
            "name": output_name, "shape": ["N", out_channels, s, s], "dtype": "float32",
            "meaning": ("logits of the lesion class: sigmoid(logits) is the lesion probability" if supervised
                        else "logits of the anomaly class: sigmoid(logits) is the anomaly probability" if segmenter
                        else "reconstruction of the input in normalised units (what normal tissue would look like)"),
        },
        "tta": tta,
        "score": (("probability = (sigmoid(logits(x)) + flip(sigmoid(logits(flip(x))))) / 2 with flip the "
                   "left-right flip of the last axis (test-time augmentation, 'tta')" if tta else
                   "probability = sigmoid(logits)") + ", resized back to the image's size (bilinear, "
                  "align_corners=False, no antialiasing)" if supervised else
                  "anomaly map = sigmoid(logits)" + _MAP_TAIL if segmenter else
                  "anomaly map = |image - reconstruction| averaged over channels, set to zero outside the "
                  "foreground (Otsu threshold, largest components, holes filled, eroded by anomaly.erode "
                  "pixels), median filtered (anomaly.median_size) at the model size, then resized back to the "
                  "image's size (bilinear, align_corners=False, no antialiasing)"),
        "postprocess": meta["postprocess"],
        "postprocess_meaning": "mask = score > threshold; connected components smaller than min_size pixels "
                               "(of the original image) removed; holes filled if fill_holes; boundary smoothed "
                               "with a disk of smooth_radius; foreground_only: only inside the image foreground. "
                               "Chosen on the validation split (see calibration).",
        "calibration": meta.get("calibration"),
    }
    if not supervised:
        doc["anomaly"] = meta.get("anomaly")
    if predictor.dim == 3:
        _describe_3d(doc, predictor, out_channels)
    return doc


def _describe_3d(doc: dict[str, Any], predictor: Predictor, out_channels: int) -> None:
    """The sidecar's input/output/score entries for a 3D model: patches and sliding windows."""
    patch, c = [int(p) for p in predictor.patch], predictor.channels
    doc["input"].update({"shape": ["N", c, *patch], "layout": "NCDHW (channels first)", "patch": patch,
                         "spacing_mm": predictor.spacing})
    doc["input"].pop("size", None)
    doc["input"]["slicing"] = ("a volume (C, Z, Y, X) is normalised as a whole, then resampled (trilinear, "
                               f"align_corners=False) to the training spacing {predictor.spacing} mm; a folder of "
                               "2D slices is stacked into one volume in slice order (spacing 1 x pixel spacing)")
    doc["input"]["resize"] = (f"sliding windows of {patch} voxels with {OVERLAP:g} overlap (volumes smaller than "
                              "a patch zero-padded); the window outputs are averaged with Gaussian weights, "
                              "sigma = patch / 8 (MONAI sliding_window_inference, mode='gaussian')")
    doc["output"]["shape"] = ["N", out_channels, *patch]
    doc["score"] = doc["score"].replace("resized back to the image's size (bilinear",
                                        "the stitched volume resampled back to the input grid (trilinear")
    doc["score"] = doc["score"].replace("at the model size, then resized back", "at the training spacing, then "
                                        "resampled back")


def onnx_forward(session) -> Callable[[torch.Tensor], torch.Tensor]:
    """A drop-in for ``Predictor._forward``: (N, C, S, S) tensor -> ONNX Runtime -> float32 tensor."""
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(session.run(None, {name: arr})[0])

    return forward


def load_session(onnx_path: Path, predictor: Predictor, threads: int | None = None):
    """A session on ``onnx_path``, checked against the model directory's input spec."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise MedanomalyError(f"{onnx_path} does not exist; create it with 'medanomaly export "
                              f"{predictor.model_dir} --format onnx'")
    sidecar = sidecar_path(onnx_path)
    if sidecar.is_file():  # an export of other weights (retrained since) must not run silently
        try:
            exported_from = json.loads(sidecar.read_text()).get("model_pt_sha256")
        except ValueError:
            exported_from = None
        if exported_from and exported_from != _sha256(predictor.model_dir / "model.pt"):
            raise MedanomalyError(f"{onnx_path} was exported from other weights than {predictor.model_dir}/model.pt "
                                  f"(retrained since?); re-export it with 'medanomaly export {predictor.model_dir}'")
    session = new_session(onnx_path, threads)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = input_shape(predictor)
    expected_output = output_name_of(predictor)
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != want or [o.name for o in outputs] != [expected_output]:
        raise MedanomalyError(f"{onnx_path} (input {[i.shape for i in inputs]}, outputs {[o.name for o in outputs]}) "
                              f"does not match {predictor.model_dir}/model.json (input [N, {', '.join(map(str, want))}], "
                              f"output {expected_output}); re-export it with 'medanomaly export'")
    return session


class OnnxRunner:
    """``Predictor`` with the network run by ONNX Runtime: same ``scores``/``predict`` contract.

    ``OnnxRunner(model_dir)`` loads ``model_dir/model.onnx`` (or ``onnx_path``) and builds a
    :class:`Predictor` whose pre- and post-processing are used unchanged; only its network call
    (``_forward``) is replaced by the ONNX Runtime session (fp32). For the 'intensity' anomaly
    method (no network) there is nothing to run: the Predictor is used as is.
    """

    def __init__(self, model_dir: str | Path, onnx_path: str | Path | None = None, batch_size: int = 16,
                 threads: int | None = None):
        self.predictor = Predictor(model_dir, "cpu", batch_size)
        self.session = None
        if self.predictor.model is not None:
            path = Path(onnx_path) if onnx_path is not None else self.predictor.model_dir / "model.onnx"
            self.session = load_session(path, self.predictor, threads)
            self.predictor._forward = onnx_forward(self.session)  # type: ignore[method-assign]
            self.predictor.precision = "fp32"

    @property
    def meta(self) -> dict:
        return self.predictor.meta

    @property
    def post(self):
        return self.predictor.post

    @property
    def task(self) -> str:
        return self.predictor.task

    def scores(self, image: Image) -> np.ndarray:
        """Probability map or anomaly map (float32, image.spatial_shape), as ``Predictor.scores``."""
        return self.predictor.scores(image)

    def predict(self, image: Image) -> Prediction:
        return self.predictor.predict(image)
