"""Export a model directory's network to ONNX: ``model.onnx`` and the JSON sidecar
``model.onnx.json``, written atomically. Running them is :mod:`medanomaly.infer.onnx_runtime`'s job.

What is exported is the network only, in fp32, channels first (NCHW), with a dynamic batch axis:

- input ``image``: (N, C, size, size) float32, the image normalised and resized as predict does
  (described in the sidecar); for a 3D model (N, C, *patch), patches of the volume resampled to
  the training spacing, scored by Gaussian-weighted sliding windows;
- output ``logits`` (supervised task: ``sigmoid(logits)`` is the lesion probability) or
  ``reconstruction`` (anomaly task: the network's normal-looking version of the input).

Pre-processing (normalisation, slicing of volumes, resizing) and post-processing (anomaly map,
resizing back, threshold, component filtering) stay outside the ONNX graph: the sidecar documents
them for other runtimes, and ``Predictor(model_dir, runtime="onnx")`` reuses medanomaly's own code
for them, so its scores equal ``Predictor(model_dir).scores`` up to floating-point rounding (both
fp32; a Predictor running in bf16 differs by bf16 rounding).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medanomaly.config.model_file import ModelFile, read_model_file
from medanomaly.core import jsonio
from medanomaly.core.atomic import atomic_path, file_sha256
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import check_new_file
from medanomaly.core.version import __version__
from medanomaly.infer.backend import load_weights
from medanomaly.infer.onnx_runtime import (
    INPUT_NAME,
    network_input_shape,
    new_session,
    output_name,
    require,
    sidecar_path,
)
from medanomaly.infer.sliding import OVERLAP

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


def export_onnx(model_dir: Path, out_path: Path | None = None, opset: int = 17, overwrite: bool = False) -> Path:
    """Export the network of ``model_dir`` to ONNX (``out_path``, default ``model_dir/model.onnx``)
    and write the sidecar ``<out_path>.json``; return ``out_path``.

    fp32, eval mode, NCHW input ``image`` of shape (N, channels, size, size) (3D models: NCDHW,
    (N, channels, *patch)) with a dynamic batch axis N; output ``logits`` (supervised) or
    ``reconstruction`` (anomaly). Both files are written atomically. After export, ONNX Runtime is
    run on two random images and compared with the PyTorch network (fp32): a difference above
    :data:`VERIFY_ATOL` is an error; the value found is recorded in the sidecar. Raises
    :class:`MedanomalyError` for a model without a network (the 'intensity' anomaly method), for an
    ``out_path`` that cannot be a file or whose file or sidecar exists already (without
    ``overwrite``; checked before exporting) and for anything that stops the export.
    """
    model_dir = Path(model_dir)
    mf = read_model_file(model_dir)
    if not mf.has_network:
        raise MedanomalyError(f"{model_dir} uses the '{mf.anomaly.method if mf.anomaly else '?'}' anomaly method, "
                              "which has no network: nothing to export (its score is the normalised intensity itself)")
    out_path = Path(out_path) if out_path is not None else model_dir / "model.onnx"
    check_export_out(out_path, overwrite)
    net = load_weights(model_dir, mf.model, torch.device("cpu"), mf.weights_sha256)
    if not isinstance(opset, int) or not 13 <= opset <= 20:
        raise MedanomalyError(f"ONNX opset {opset!r} is not supported; use 13..20 (default 17)")
    require("onnx")  # torch.onnx.export (dynamo=False) serialises through it
    require("onnxruntime")  # the check after export
    name, shape = output_name(mf), network_input_shape(mf)
    model = net.float().to(memory_format=torch.contiguous_format).eval()
    with atomic_path(out_path) as tmp:
        _torch_export(model, torch.zeros(2, *shape), tmp, name, opset)
        max_diff = _verify(model, tmp, shape)
        digest = file_sha256(tmp)
    sidecar = describe(mf, model_dir, out_path, opset, digest, max_diff)
    jsonio.write_json(sidecar_path(out_path), sidecar, indent=2)
    return out_path


def check_export_out(out_path: Path, overwrite: bool) -> None:
    """``out_path`` and its sidecar can be written as files, and replace nothing without ``overwrite``."""
    check_new_file(out_path, overwrite)
    check_new_file(sidecar_path(out_path), overwrite, "its sidecar")


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path, out_name: str, opset: int) -> None:
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
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[out_name],
                              opset_version=opset, dynamic_axes={INPUT_NAME: {0: "N"}, out_name: {0: "N"}},
                              dynamo=False)
    except MedanomalyError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter errors become one user-facing error
        raise MedanomalyError(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc


def _verify(model: torch.nn.Module, path: Path, shape: list[int]) -> float:
    """Largest difference between ONNX Runtime and the fp32 network on two seeded random inputs."""
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


def describe(mf: ModelFile, model_dir: Path, onnx_path: Path, opset: int, onnx_sha256: str,
             max_diff: float) -> dict[str, Any]:
    """The sidecar: everything another runtime needs to reproduce ``Predictor.scores``."""
    name, supervised = output_name(mf), mf.task == "supervised"
    out_channels = 1 if name == "logits" else mf.input.channels  # logits: supervised, or method 'synthetic'
    doc: dict[str, Any] = {
        "format": "medanomaly-onnx",
        "medanomaly_version": __version__,
        "model_medanomaly_version": mf.medanomaly_version,
        "task": mf.task,
        "model_pt_sha256": file_sha256(model_dir / "model.pt"),
        "onnx": {"file": onnx_path.name, "sha256": onnx_sha256, "opset": opset, "precision": "fp32",
                 "exporter": f"torch {torch.__version__} (TorchScript-based, dynamo=False)",
                 "check": {"max_abs_diff_vs_pytorch_fp32": max_diff, "inputs": "2 random images"}},
        "input": _describe_input(mf),
        "output": {"name": name, "shape": ["N", out_channels, mf.input.size, mf.input.size], "dtype": "float32",
                   "meaning": _OUTPUT_MEANING["supervised" if supervised else name]},
        "tta": mf.input.tta and supervised,
        "score": _describe_score(mf, name),
        "postprocess": mf.postprocess.to_dict(),
        "postprocess_meaning": "mask = score > threshold; connected components smaller than min_size pixels "
                               "(of the original image) removed; holes filled if fill_holes; boundary smoothed "
                               "with a disk of smooth_radius; foreground_only: only inside the image foreground. "
                               "Chosen on the validation split (see calibration).",
        "calibration": mf.calibration,
    }
    if mf.anomaly is not None:
        doc["anomaly"] = mf.anomaly.to_dict()
    if mf.input.dim == 3:
        _describe_3d(doc, mf, out_channels)
    return doc


_OUTPUT_MEANING = {
    "supervised": "logits of the lesion class: sigmoid(logits) is the lesion probability",
    "logits": "logits of the anomaly class: sigmoid(logits) is the anomaly probability",
    "reconstruction": "reconstruction of the input in normalised units (what normal tissue would look like)",
}


def _describe_input(mf: ModelFile) -> dict[str, Any]:
    """The sidecar's input entry of a 2D model (:func:`_describe_3d` changes it for a 3D one)."""
    c, s, norm = mf.input.channels, mf.input.size, mf.input.normalization
    return {
        "name": INPUT_NAME, "shape": ["N", c, s, s], "dtype": "float32", "layout": "NCHW (channels first)",
        "channels": c, "size": s, "normalization": norm, "normalization_meaning": NORMALIZATION_MEANING.get(norm, ""),
        "slicing": "2D images (C, H, W) are one input; volumes (C, Z, Y, X) are cut into Z slices "
                   "(C, Y, X) along the first spatial axis, normalised as a whole volume first",
        "resize": f"bilinear to {s} x {s}, antialiased when shrinking (torch.nn.functional.interpolate("
                  "mode='bilinear', align_corners=False, antialias=True)); no resize if already that size",
    }


def _describe_score(mf: ModelFile, name: str) -> str:
    """How the score map is made from the network output (2D wording; 3D: :func:`_describe_3d`)."""
    if mf.task == "supervised":
        prob = ("probability = (sigmoid(logits(x)) + flip(sigmoid(logits(flip(x))))) / 2 with flip the left-right "
                "flip of the last axis (test-time augmentation, 'tta')" if mf.input.tta
                else "probability = sigmoid(logits)")
        return prob + ", resized back to the image's size (bilinear, align_corners=False, no antialiasing)"
    if name == "logits":
        return "anomaly map = sigmoid(logits)" + _MAP_TAIL
    return ("anomaly map = |image - reconstruction| averaged over channels, set to zero outside the "
            "foreground (Otsu threshold, largest components, holes filled, eroded by anomaly.erode "
            "pixels), median filtered (anomaly.median_size) at the model size, then resized back to the "
            "image's size (bilinear, align_corners=False, no antialiasing)")


def _describe_3d(doc: dict[str, Any], mf: ModelFile, out_channels: int) -> None:
    """The sidecar's input/output/score entries for a 3D model: patches and sliding windows."""
    patch, c = [int(p) for p in mf.input.patch or ()], mf.input.channels
    spacing = None if mf.input.spacing is None else list(mf.input.spacing)  # mm, as model.json writes it
    doc["input"].update({"shape": ["N", c, *patch], "layout": "NCDHW (channels first)", "patch": patch,
                         "spacing_mm": spacing})
    doc["input"].pop("size", None)
    doc["input"]["slicing"] = ("a volume (C, Z, Y, X) is normalised as a whole, then resampled (trilinear, "
                               f"align_corners=False) to the training spacing {spacing} mm; a folder of "
                               "2D slices is stacked into one volume in slice order (spacing 1 x pixel spacing)")
    doc["input"]["resize"] = (f"sliding windows of {patch} voxels with {OVERLAP:g} overlap (volumes smaller than "
                              "a patch zero-padded); the window outputs are averaged with Gaussian weights, "
                              "sigma = patch / 8 (MONAI sliding_window_inference, mode='gaussian')")
    doc["output"]["shape"] = ["N", out_channels, *patch]
    doc["score"] = doc["score"].replace("resized back to the image's size (bilinear",
                                        "the stitched volume resampled back to the input grid (trilinear")
    doc["score"] = doc["score"].replace("at the model size, then resized back", "at the training spacing, then "
                                        "resampled back")
