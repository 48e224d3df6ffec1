"""Inference: a model directory applied to images, one file at a time (bounded memory), written
back in each input's own geometry and format.

For an input ``rel/stem.ext`` below an input root, ``predict`` writes ``rel/stem_pred.<ext>``
(binary mask), ``rel/stem_score.<tif|nii.gz|nrrd>`` (float32 probability map),
``rel/stem_overlay.png`` and, at the output root, ``regions.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from medanomaly.anomaly.methods import AnomalyConfig, output_channels, residual_map
from medanomaly.core import distributed as distributed
from medanomaly.core.atomic import atomic_write_text
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import autocast, choose_precision
from medanomaly.core.version import __version__
from medanomaly.data.slices import is_mask_file, normalize, resize, to_slices
from medanomaly.infer.overlay import best_slice, overlay_rgb, save_png
from medanomaly.io import (
    IMAGE_SUFFIXES,
    Image,
    full_suffix,
    is_dicom_series_dir,
    read_image,
    stem_of,
    write_mask,
    write_score,
)
from medanomaly.io.dicomseg import write_dicom_seg
from medanomaly.models.build import build_model
from medanomaly.models.unet import UNet, UNetConfig
from medanomaly.postprocess.ops import PostprocessParams, apply, region_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    image: Image
    score: np.ndarray  # float32, image.spatial_shape, probability in [0, 1]
    mask: np.ndarray  # bool, image.spatial_shape


def read_model_meta(model_dir: str | Path) -> dict:
    """model.json of a model directory, checked: a clear error for anything else."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise MedanomalyError(f"{model_dir} is not a medanomaly model directory (no model.json); "
                              "pass the --out folder of 'medanomaly train'")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise MedanomalyError(f"{path} is not valid JSON ({exc}); the model directory is damaged: retrain") from exc
    if not isinstance(meta, dict) or meta.get("format") != "medanomaly-model":
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise MedanomalyError(f"{path} is not a medanomaly model file (format {found!r}, expected "
                              "'medanomaly-model'); pass the --out folder of 'medanomaly train'")
    return meta


def _check_spec(meta: dict) -> None:
    """model.json must agree with itself: the input channels are those of the network (an edited or
    mixed-up file would otherwise fail later, image by image, with a misleading message)."""
    spec, net, task = meta["input"], meta["model"], meta.get("task", "supervised")
    if task not in ("supervised", "anomaly"):
        raise ValueError(f"task {task!r} is not 'supervised' or 'anomaly'")
    if meta.get("anomaly", {}).get("method") == "intensity":  # no network: its 'model' section is unused
        return
    if spec["channels"] != net["in_channels"]:
        raise ValueError(f"input.channels is {spec['channels']} but model.in_channels is {net['in_channels']}")
    method = meta.get("anomaly", {}).get("method", "denoise")
    expected_out = output_channels(method, net["in_channels"]) if task == "anomaly" else 1
    if net["out_channels"] != expected_out:
        raise ValueError(f"model.out_channels is {net['out_channels']}; a {task} model has {expected_out}")


class Predictor:
    """A trained model with its preprocessing and post-processing, as saved by ``train``."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
                 runtime: str = "torch"):
        self.model_dir = Path(model_dir)
        self.meta = read_model_meta(self.model_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:  # a damaged or hand-edited model.json: one clear error, not a KeyError or TypeError
            _check_spec(self.meta)
            spec = self.meta["input"]
            self.size, self.channels, self.normalization = spec["size"], spec["channels"], spec["normalization"]
            self.tta = bool(spec.get("tta", False))  # average with the left-right flipped prediction
            # 3D models (medanomaly.train.loop3d): patch (voxels) and training spacing (mm) of sliding-window inference
            self.dim, self.patch, self.spacing = int(spec.get("dim", 2)), spec.get("patch"), spec.get("spacing")
            self.post = PostprocessParams.from_dict(self.meta["postprocess"])
            self.precision = choose_precision(self.meta.get("precision", "auto"), self.device)
            self.task = self.meta.get("task", "supervised")
            self.anomaly = AnomalyConfig(**self.meta["anomaly"]) if self.task == "anomaly" else None
            net_cfg = UNetConfig(**self.meta["model"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc)
            raise MedanomalyError(f"{self.model_dir / 'model.json'} is damaged or was edited ({what}); restore it "
                                  "from the training run or retrain") from exc
        needs_net = self.anomaly is None or self.anomaly.method != "intensity"
        self.model = load_weights(self.model_dir, net_cfg, self.device) if needs_net else None
        if runtime not in ("torch", "onnx"):
            raise MedanomalyError(f"unknown runtime {runtime!r}; valid: torch, onnx")
        self.runtime = runtime
        if runtime == "onnx" and self.model is not None:  # the 'intensity' method has no network to run
            from medanomaly.infer.export import load_session, onnx_forward

            if self.device.type != "cpu":
                raise MedanomalyError("--runtime onnx runs on the CPU; use --device cpu (or --runtime torch)")
            self._forward = onnx_forward(load_session(self.model_dir / "model.onnx", self))  # type: ignore[method-assign]
            self.precision = "fp32"

    def scores(self, image: Image) -> np.ndarray:
        """Probability map (float32, image.spatial_shape) for one image or volume (slice-wise)."""
        if image.channels != self.channels:
            raise MedanomalyError(f"{image.path} has {image.channels} channels but the model was trained on "
                                  f"{self.channels}-channel images; convert the image or use a matching model")
        if self.dim == 3:  # whole volume: resampled, sliding window, resampled back (medanomaly.infer.volume)
            from medanomaly.infer.volume import volume_scores

            return volume_scores(self, image)
        a = normalize(image.array, self.normalization, image.geometry.kind, image.geometry.meta.get("dtype"))
        slices = torch.from_numpy(np.ascontiguousarray(to_slices(a)))
        h, w = slices.shape[-2:]
        out = []
        with torch.inference_mode():
            for i in range(0, slices.shape[0], self.batch_size):
                x = resize(slices[i:i + self.batch_size], (self.size, self.size))
                score = self._anomaly_map(x) if self.anomaly else self._probability(x)
                score = torch.nn.functional.interpolate(score, size=(h, w), mode="bilinear", align_corners=False)
                out.append(score[:, 0].cpu())
        score = torch.cat(out).numpy().astype(np.float32)
        return score[0] if image.array.ndim == 3 else score

    def _probability(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, 1, S, S) lesion probability, averaged over a left-right flip if tta."""
        prob = torch.sigmoid(self._forward(x).float())
        if self.tta:
            prob = 0.5 * (prob + torch.sigmoid(self._forward(x.flip(-1)).float()).flip(-1))
        return prob

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if next(self.model.parameters()).is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return self.model(x)

    def network_output(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly task: (N, C, S, S) -> the reconstruction (N, C, S, S), or for method synthetic
        the anomaly probability (N, 1, S, S); float32 on the CPU."""
        out = self._forward(x).float()
        return (torch.sigmoid(out) if self.anomaly.method == "synthetic" else out).cpu()

    def _anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) normalised slices -> (N, 1, S, S) residual maps at the model size."""
        recon = None if self.model is None else self.network_output(x).numpy()
        xs = x.numpy()
        maps = [residual_map(xs[k], None if recon is None else recon[k], self.anomaly) for k in range(len(xs))]
        return torch.from_numpy(np.stack(maps)[:, None])

    def predict(self, image: Image) -> Prediction:
        score = self.scores(image)
        return Prediction(image, score, apply(score, self.post, image=_grey(image)))


def _grey(image: Image) -> np.ndarray:
    return image.array.mean(axis=0)


def load_weights(model_dir: Path, cfg: UNetConfig, device: torch.device) -> UNet:
    """Build the network and load model.pt without unpickling code (weights_only=True)."""
    import pickle
    import re
    import warnings

    path = model_dir / "model.pt"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MedanomalyError(f"{path} is missing; the model directory is incomplete: retrain") from exc
    except pickle.UnpicklingError as exc:  # code or objects other than tensors: refused, nothing ran
        found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(exc))
        raise MedanomalyError(f"refused to load {path}: it is not a plain weights file ("
                              f"{found.group(0) if found else 'it holds objects other than tensors'}); it was not "
                              "executed. Use the model.pt written by 'medanomaly train' (restore it or retrain)") from exc
    except Exception as exc:  # truncated or not a PyTorch file at all
        raise MedanomalyError(f"cannot read weights {path} ({type(exc).__name__}: {_first_line(exc)}); the file is "
                              "truncated or damaged: restore it or retrain") from exc
    try:
        model = build_model(cfg)
        model.load_state_dict(state)
    except Exception as exc:  # weights of another architecture, or not a state dict
        raise MedanomalyError(f"the weights {path} do not fit the network described in {model_dir / 'model.json'} "
                              f"({_first_line(exc, skip='Error(s) in loading')}); the two files come from different "
                              "models: restore the pair from one training run or retrain") from exc
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if cfg.dim == 2 else model


def _first_line(exc: Exception, skip: str = "") -> str:
    """The first informative line of an exception message (torch's are long and multi-line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not (skip and ln.strip().startswith(skip))]
    return (lines[0] if lines else repr(exc))[:300]


def iter_inputs(inputs: list[str | Path]) -> Iterator[tuple[Path, Path]]:
    """(root, path) for each image below the inputs; masks and our own outputs are skipped."""
    for given in map(Path, inputs):
        if not given.exists():
            raise MedanomalyError(f"input {given} does not exist")
        if given.is_file() or is_dicom_series_dir(given):
            yield given.parent, given
            continue
        for path in sorted(given.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(given).parts):
                continue
            if path.is_dir() and is_dicom_series_dir(path):
                yield given, path
            elif path.is_file() and full_suffix(path) in IMAGE_SUFFIXES and not is_mask_file(path) \
                    and not _is_output(path) and not is_dicom_series_dir(path.parent):
                yield given, path


def _is_output(path: Path) -> bool:
    return stem_of(path).endswith(("_pred", "_score", "_overlay", "_seg"))


def output_stem(out: Path, root: Path, path: Path) -> Path:
    rel = path.relative_to(root)
    return out / rel.parent / stem_of(path)


def check_output_dir(out: Path, inputs: list[str | Path]) -> None:
    """predict/evaluate never write inside an input tree."""
    out_r = out.resolve()
    for given in map(Path, inputs):
        root = given.resolve() if given.is_dir() else given.resolve().parent
        if out_r == root or root in out_r.parents:
            raise MedanomalyError(f"output folder {out} is inside the input {given}; choose an --out outside it "
                                  "so inputs are never mixed with results")


def write_prediction(pred: Prediction, stem: Path, dicom_seg: bool = False) -> dict:
    """Write mask, score map and overlay for one prediction; return its regions record.

    ``dicom_seg``: for a DICOM series folder, also ``stem_seg.dcm``, the mask as a DICOM SEG
    referencing the series (it carries the patient/study identifiers the standard requires)."""
    write_mask(pred.mask, pred.image, Path(f"{stem}_pred"))
    write_score(pred.score, pred.image, Path(f"{stem}_score"))
    outputs = {}
    if dicom_seg and pred.image.geometry.kind == "dicom" and pred.image.path.is_dir():
        outputs["dicom_seg"] = write_dicom_seg(pred.mask, pred.image.path, Path(f"{stem}_seg.dcm"),
                                               version=__version__).name
    img, score, mask = pred.image.array, pred.score, pred.mask
    if score.ndim == 3:
        k = best_slice(score, mask)
        img, score, mask = img[:, k], score[k], mask[k]
    save_png(overlay_rgb(img, score, mask), Path(f"{stem}_overlay.png"))
    g = pred.image.geometry
    return {"regions": region_table(pred.mask, pred.score, g.spacing if g.spacing_known else None), **outputs}


def predict_paths(model_dir: str | Path, inputs: list[str | Path], out: str | Path, device: str = "cpu",
                  overwrite: bool = False, progress: bool = True, runtime: str = "torch",
                  dicom_seg: bool = True) -> dict:
    """Predict every image below ``inputs`` into ``out``; keep going past bad files.

    In a process group (``torchrun``), process r of W predicts inputs r, r + W, ... of the sorted
    list and rank 0 writes regions.json for all of them: the same files as one process writes.
    Returns {"n_ok": int, "failed": [{"input": str, "error": str}], "out": str}.
    """
    from tqdm import tqdm

    out = Path(out)
    for given in map(Path, inputs):  # a missing input is reported as such, before anything else
        if not given.exists():
            raise MedanomalyError(f"input {given} does not exist")
    check_output_dir(out, inputs)
    if (out / "regions.json").exists() and not overwrite:
        raise MedanomalyError(f"{out} already holds predictions; pass --overwrite or choose another --out")
    items = list(iter_inputs(inputs))
    if not items:
        raise MedanomalyError(f"no images found in {', '.join(map(str, inputs))} (masks and earlier outputs are "
                              f"skipped); supported files: {', '.join(IMAGE_SUFFIXES)} or DICOM series folders")
    predictor = Predictor(model_dir, device, runtime=runtime)
    records, failed = [], []
    if predictor.dim == 3:  # 3D model: a folder of 2D slices is one stacked volume (rank 0 predicts all)
        from medanomaly.infer.volume import predict_items_3d

        recs, fails = predict_items_3d(predictor, items if distributed.is_main() else [], out, dicom_seg, progress)
        records, failed, items = list(enumerate(recs)), list(enumerate(fails)), []
    rank, world = distributed.rank(), distributed.world_size()  # under torchrun: every world-th file here
    for k, (root, path) in enumerate(tqdm(items[rank::world], desc="predict", unit="img", disable=not progress)):
        stem, index = output_stem(out, root, path), k * world + rank
        try:
            rec = write_prediction(predictor.predict(read_image(path)), stem, dicom_seg)
        except MedanomalyError as exc:
            log.info("skipped %s (reported at the end)", path.name)
            failed.append((index, {"input": str(path), "error": str(exc)}))
            continue
        records.append((index, {"case": str(stem.relative_to(out)), **rec}))
    shards = distributed.gather_objects((records, failed))  # back in input order, as one process writes them
    records = [r for _, r in sorted((x for recs, _ in shards for x in recs), key=lambda t: t[0])]
    failed = [f for _, f in sorted((x for _, fails in shards for x in fails), key=lambda t: t[0])]
    meta = {"medanomaly_version": __version__, "model": str(model_dir), "runtime": runtime,
            "threshold": predictor.post.threshold}
    if distributed.is_main():
        atomic_write_text(out / "regions.json", json.dumps({**meta, "images": records, "failed": failed}, indent=1))
    return {"n_ok": len(records), "failed": failed, "out": str(out)}
