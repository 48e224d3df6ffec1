"""The predictor: a model directory rebuilt from its model file (:mod:`medanomaly.config.model_file`)
and applied to one image or volume at a time, on its own grid.

One :class:`Predictor` serves 2D and 3D models and both runtimes: the network sits behind a
:class:`~medanomaly.infer.backend.Backend` (PyTorch, or ONNX Runtime for ``runtime="onnx"``), and
two scoring paths feed it. A volume is first brought to the canonical orientation
(:mod:`medanomaly.io.orient`, when the model file's ``geometry`` record names one: the model was
trained so) and its score map mapped back exactly to the stored grid; :func:`geometry_warning` says
once per input when it is far from the training data.

- 2D (``input.dim`` 2): the image (C, H, W) or each axial slice of a volume (C, Z, Y, X) is
  normalised (the volume as a whole), fitted to ``size`` x ``size`` (padded to a physical square,
  :func:`medanomaly.data.slices.fit`), scored in batches of ``batch_size`` slices, and the map
  resized back and cropped (bilinear, :func:`medanomaly.data.slices.unfit`);
- 3D (``input.dim`` 3): the normalised volume is resampled to the training spacing, scored by
  Gaussian-weighted sliding windows (:func:`medanomaly.infer.sliding.sliding_window`) and the map
  resampled back (trilinear); a 2D image is a one-slice volume.

Both then share what turns network outputs into a score map (:func:`score_batch`): the lesion
probability, averaged with the left-right flipped prediction for ``tta``, or the anomaly map
(:func:`medanomaly.anomaly.methods.residual_map`) of the reconstruction. Score maps are float32 of
the image's spatial shape. A model of several labels (the model file's ``labels``, 2D) gives one
softmax probability map per label, (K, *S), and its mask is a label map (:func:`label_map`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medanomaly.anomaly.methods import residual_map
from medanomaly.config.labels import Label
from medanomaly.config.model_file import ModelFile, read_model_file
from medanomaly.config.options import RUNTIMES
from medanomaly.config.sections import AnomalyConfig, PostprocessParams
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import choose_precision
from medanomaly.data.slices import fit, normalize, plane_spacing, to_slices, unfit
from medanomaly.data.volumes import resample, resampled_shape
from medanomaly.infer.backend import Backend, TorchBackend, load_weights
from medanomaly.infer.onnx_runtime import OnnxBackend, load_session
from medanomaly.infer.sliding import OVERLAP, sliding_window
from medanomaly.io import Image
from medanomaly.io.orient import PLANES, Reorientation, canonical
from medanomaly.postprocess.ops import apply

log = logging.getLogger(__name__)
Net = Callable[[torch.Tensor], torch.Tensor]  # (N, C, *S) -> (N, out_channels, *S), float32 on the CPU
WINDOW_BATCH = 2  # 3D: sliding windows per network call
FAR_SPACING = 2.0  # an input whose spacing differs from the training median by more than this factor is warned about


def geometry_warning(stored: Image, image: Image, turn: Reorientation, record: dict, dim: int) -> str | None:
    """Why ``image`` (``stored`` brought to the canonical orientation by ``turn``) is far from the
    training data of the model file's ``geometry`` ``record`` (None if it is not): an acquisition
    plane other than the training data's (2D models always cut axial slices), slices cut through the
    volume's coarse axis, or a spacing more than :data:`FAR_SPACING` times off the training median."""
    if image.ndim_spatial != 3 or not image.geometry.spacing_known:
        return None
    notes = []
    plane, trained = PLANES[turn.slice_axis], record.get("slice_plane") or ("axial" if dim == 2 else None)
    if trained and plane != trained:
        notes.append(f"it was acquired in {plane} slices but the model was trained on {trained} ones; it is "
                     f"predicted after reorientation{' (axial slices)' if dim == 2 else ''}")
    sp = np.asarray(image.geometry.spacing, float)
    if dim == 2 and sp[1:].max() > FAR_SPACING * sp.min():
        notes.append(f"its {' x '.join(f'{v:.3g}' for v in sp)} mm voxels are resliced through their coarse "
                     "axis, so each axial slice is blurred along it")
    median = record.get("median_spacing")
    if median:
        axes = slice(1, 3) if dim == 2 else slice(0, 3)
        ratio = np.maximum(sp / np.asarray(median, float), np.asarray(median, float) / sp)[axes]
        if ratio.max() > FAR_SPACING:
            notes.append(f"its spacing {' x '.join(f'{v:.3g}' for v in sp)} mm (Z Y X, reoriented) is more than "
                         f"{FAR_SPACING:g} times off the training median {' x '.join(f'{v:.3g}' for v in median)} mm")
    return (f"{stored.path}: {'; '.join(notes)}. Check the result, or train on data like it") if notes else None


@dataclass(frozen=True)
class Prediction:
    """One image's (or volume's) score map and its post-processed mask, on the image's own grid;
    several ``labels``: one probability map per label and a label map."""

    image: Image
    score: np.ndarray  # float32, image.spatial_shape, probability (or anomaly score); several labels: (K, *S)
    mask: np.ndarray  # bool, image.spatial_shape; several labels: uint8 label map (the label values, 0 background)
    labels: tuple[Label, ...] = ()


def probability(net: Net, x: torch.Tensor, tta: bool, classes: int = 1) -> torch.Tensor:
    """(N, C, *S) -> (N, 1, *S) lesion probability, averaged with the prediction of the left-right
    flipped input (flipped back) if ``tta``; ``classes`` > 1 (softmax over background + labels): the
    probability of each label, (N, classes - 1, *S)."""
    def prob_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if classes == 1 else torch.softmax(logits, dim=1)[:, 1:]

    prob = prob_of(net(x))
    if tta:
        prob = 0.5 * (prob + prob_of(net(x.flip(-1))).flip(-1))
    return prob


def label_map(scores: np.ndarray, posts: Sequence[PostprocessParams], labels: Sequence[Label],
              image: np.ndarray | None = None) -> np.ndarray:
    """Probability maps (K, *S) of K labels -> uint8 label map (*S) of the label values: each label's
    mask by its own post-processing (threshold, minimum component size... chosen on val), a pixel
    claimed by several labels going to the most probable one. ``image``: grey (*S), for
    ``foreground_only``."""
    masks = np.stack([apply(scores[k], posts[k], image=image) for k in range(len(labels))])
    best = np.where(masks, scores, -np.inf).argmax(axis=0)
    values = np.array([lb.value for lb in labels], np.uint8)
    return np.where(masks.any(axis=0), values[best], 0).astype(np.uint8)


def reconstruction(net: Net, x: torch.Tensor, anomaly: AnomalyConfig) -> torch.Tensor:
    """Anomaly task: (N, C, *S) -> the reconstruction (N, C, *S), or for method synthetic the
    anomaly probability (N, 1, *S)."""
    out = net(x)
    return torch.sigmoid(out) if anomaly.method == "synthetic" else out


def anomaly_maps(x: torch.Tensor, recon: torch.Tensor | None, anomaly: AnomalyConfig) -> torch.Tensor:
    """(N, C, *S) inputs and their reconstructions (None: the 'intensity' method) -> (N, 1, *S)
    residual maps at the model's size (or training spacing)."""
    xs, rs = x.numpy(), None if recon is None else recon.numpy()
    maps = [residual_map(xs[k], None if rs is None else rs[k], anomaly) for k in range(len(xs))]
    return torch.from_numpy(np.stack(maps)[:, None])


def score_batch(x: torch.Tensor, net: Net | None, anomaly: AnomalyConfig | None, tta: bool,
                classes: int = 1) -> torch.Tensor:
    """The score maps (N, 1, *S) of a batch (N, C, *S) of normalised inputs: the probability
    (supervised; (N, classes - 1, *S) for several labels) or the anomaly map (``anomaly`` given;
    ``net`` None for the 'intensity' method)."""
    if anomaly is None:
        assert net is not None
        return probability(net, x, tta, classes)
    return anomaly_maps(x, None if net is None else reconstruction(net, x, anomaly), anomaly)


class Predictor:
    """A trained model with its pre- and post-processing, as its model file describes it.

    ``runtime``: 'torch' (the PyTorch network on ``device``, in the model's precision) or 'onnx'
    (``onnx_path``, default ``model_dir/model.onnx``, run by ONNX Runtime on the CPU in fp32).
    ``batch_size``: 2D slices per network call. ``model_file``: the model file to follow instead of
    ``model_dir/model.json`` (calibration runs the model before that file exists); the weights are
    ``model_dir/model.pt`` either way, checked against the SHA-256 the model file records.
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
                 runtime: str = "torch", onnx_path: str | Path | None = None, model_file: ModelFile | None = None):
        self.model_dir = Path(model_dir)
        self.model_file: ModelFile = model_file if model_file is not None else read_model_file(self.model_dir)
        self.device, self.batch_size, self.runtime = torch.device(device), batch_size, runtime
        spec = self.model_file.input
        self.size, self.channels, self.normalization, self.tta = spec.size, spec.channels, spec.normalization, spec.tta
        self.dim, self.patch, self.spacing = spec.dim, spec.patch, spec.spacing  # 3D: voxels, mm
        self.post, self.task, self.anomaly = self.model_file.postprocess, self.model_file.task, self.model_file.anomaly
        self.labels, self.label_posts = self.model_file.labels, self.model_file.label_posts  # (): binary
        self.classes = len(self.labels) + 1 if self.labels else 1
        if self.labels and self.dim == 3:
            raise MedanomalyError(f"{self.model_dir}: a 3D model of several labels is not supported yet; retrain in 2D")
        has_net = self.model_file.has_network  # the 'intensity' anomaly method has no network to run
        self.model = (load_weights(self.model_dir, self.model_file.model, self.device, self.model_file.weights_sha256)
                      if has_net else None)
        if runtime not in RUNTIMES:
            raise MedanomalyError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
        self.backend: Backend | None = self._backend(onnx_path) if self.model is not None else None

    def _backend(self, onnx_path: str | Path | None) -> Backend:
        assert self.model is not None
        if self.runtime == "torch":
            return TorchBackend(self.model, self.device, choose_precision(self.model_file.precision, self.device))
        if self.device.type != "cpu":
            raise MedanomalyError("--runtime onnx runs on the CPU; use --device cpu (or --runtime torch)")
        path = Path(onnx_path) if onnx_path is not None else self.model_dir / "model.onnx"
        return OnnxBackend(load_session(path, self.model_dir, self.model_file))

    @property
    def precision(self) -> str:
        """'bf16' or 'fp32': what the network computes in (settable on the PyTorch runtime)."""
        return self.backend.precision if self.backend is not None else "fp32"

    @precision.setter
    def precision(self, value: str) -> None:
        if self.backend is not None:
            self.backend.precision = value

    def scores(self, image: Image) -> np.ndarray:
        """Probability (supervised) or anomaly map, float32 of ``image.spatial_shape``, of one image
        (C, H, W) or volume (C, Z, Y, X); several labels: (K, *spatial_shape), one map per label."""
        spec = self.model_file.input  # refused by channel count, and by name where both name theirs
        spec.check_input(image.channels, tuple(image.geometry.meta.get("channel_names", ())), str(image.path))
        turn = Reorientation(stored_shape=image.spatial_shape)
        if self.model_file.geometry.get("orientation"):  # trained on reoriented volumes (older models: as stored)
            stored = image
            image, turn = canonical(image)
            warning = geometry_warning(stored, image, turn, self.model_file.geometry, self.dim)
            if warning:
                log.warning("%s", warning)
        a = normalize(np.ascontiguousarray(image.array), self.normalization, image.geometry.kind,
                      image.geometry.meta.get("dtype"), spec.channel_names)
        with torch.inference_mode():
            score = self._volume_scores(a, image) if self.dim == 3 else self._slice_scores(a, plane_spacing(image))
        return score if turn.identity else np.ascontiguousarray(turn.invert(score))

    def _slice_scores(self, a: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
        """2D path: normalised (C, H, W) or (C, Z, Y, X) -> (H, W) or (Z, Y, X) (several labels: (K, ...)),
        slice by slice, each fitted to the model size keeping its aspect ratio (pixel ``spacing`` Y, X)
        and mapped back."""
        slices = torch.from_numpy(np.ascontiguousarray(to_slices(a)))
        h, w = slices.shape[-2:]
        out = []
        for i in range(0, slices.shape[0], self.batch_size):
            x = fit(slices[i:i + self.batch_size], self.size, spacing)
            score = unfit(score_batch(x, self.backend, self.anomaly, self.tta, self.classes), (h, w), spacing)
            out.append(score[:, 0] if self.classes == 1 else score)
        score = torch.cat(out).numpy().astype(np.float32)
        if self.classes > 1:  # (Z, K, H, W) -> (K, Z, H, W): the label first, as the channels of an image
            return np.ascontiguousarray(np.moveaxis(score, 1, 0)[:, 0] if a.ndim == 3 else np.moveaxis(score, 1, 0))
        return score[0] if a.ndim == 3 else score

    def _volume_scores(self, a: np.ndarray, image: Image) -> np.ndarray:
        """3D path: normalised (C, Z, Y, X), or (C, H, W) as one slice -> its spatial shape."""
        flat = a.ndim == 3
        a = a[:, None] if flat else a
        g = image.geometry
        spacing = g.spacing if len(g.spacing) == 3 else (1.0, *g.spacing)
        x = resample(a, resampled_shape(a.shape[1:], spacing, self.spacing))
        net = None if self.backend is None else self._windows
        score = score_batch(x[None], net, self.anomaly, self.tta)[0]  # one volume: a batch of one
        back = resample(score, a.shape[1:])[0].numpy().astype(np.float32)
        return back[0] if flat else back

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """The network over a batch of one volume (1, C, *S) by sliding windows -> (1, out, *S)."""
        assert self.backend is not None and self.patch is not None
        return sliding_window(x[0], self.patch, self.backend, OVERLAP, WINDOW_BATCH)[None]

    def network_output(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly task: (N, C, S, S) normalised slices at the model size -> the reconstruction
        (N, C, S, S), or for method synthetic the anomaly probability (N, 1, S, S)."""
        assert self.backend is not None and self.anomaly is not None
        return reconstruction(self.backend, x, self.anomaly)

    def predict(self, image: Image) -> Prediction:
        """Score map and post-processed mask (the post-processing chosen on val) of one image or volume;
        several labels: the label maps' probabilities and the label map (:func:`label_map`)."""
        score = self.scores(image)
        if self.labels:
            return Prediction(image, score, label_map(score, self.label_posts, self.labels, image.array.mean(axis=0)),
                              self.labels)
        return Prediction(image, score, apply(score, self.post, image=image.array.mean(axis=0)))
