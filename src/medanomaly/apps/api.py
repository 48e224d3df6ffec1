"""The Python API: what the CLI commands do, as functions (``from medanomaly import train, predict,
evaluate, plan, Model``; reference in docs/api.md). The CLI (:mod:`medanomaly.apps.commands`) is a
thin layer over it: flags in, these calls, lines out; so the API and the CLI make the same plan and
train the same model on the same data.

``train`` makes the plan (:mod:`medanomaly.train.plan`: defaults < plan < ``config`` file < options),
trains (:func:`medanomaly.train.run.train`), then chooses the threshold and post-processing on the
validation split (:mod:`medanomaly.calibrate`), so the model directory it returns is finished; what the
options and the data listing allow is checked before the training starts. ``calibrate`` completes (or
repeats) the calibration of a trained model directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from medanomaly.calibrate.search import calibrate_and_save, calibrate_model
from medanomaly.config import schema as config_mod
from medanomaly.config.model_file import ModelFile, TrainingSummary, read_model_file
from medanomaly.config.options import TASKS
from medanomaly.config.schema import SECTION_CLASSES, TrainConfig, rule_of
from medanomaly.config.sections import PostprocessParams
from medanomaly.core import distributed
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import run_log
from medanomaly.core.runtime import resolve_device
from medanomaly.data.discover import discover
from medanomaly.evaluate.score import evaluate_model, evaluate_predictions
from medanomaly.infer.predictor import Predictor
from medanomaly.infer.run import predict_paths
from medanomaly.io import Geometry, Image, read_image
from medanomaly.train import plan as planning
from medanomaly.train.plan import Plan
from medanomaly.train.prepare import usable_and_splits
from medanomaly.train.run import TrainResult
from medanomaly.train.run import train as _train_run

log = logging.getLogger(__name__)

__all__ = ["Model", "calibrate", "evaluate", "option_keys", "plan", "predict", "train"]


def option_keys() -> tuple[str, ...]:
    """The keys ``train``'s options may set: TrainConfig's fields (:mod:`medanomaly.config.schema`,
    the one place of defaults and rules), its sections' fields dotted (``model.width``)."""
    top = [f.name for f in fields(TrainConfig) if f.name not in SECTION_CLASSES]
    nested = [f"{name}.{f.name}" for name, cls in SECTION_CLASSES.items() for f in fields(cls)]
    return tuple(sorted(top + nested))


def _overrides(options: Mapping[str, Any]) -> dict[str, Any]:
    """``train``'s keyword options as :func:`medanomaly.config.schema.load` overrides. A section may be
    a dict (``model={"width": 8}``) or dotted keys (``**{"model.width": 8}``); paths become text (as
    config.json stores them); None means not given. Unknown keys: one error naming the valid ones."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if key in SECTION_CLASSES and isinstance(value, Mapping):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(option_keys()))
    if unknown:
        raise MedanomalyError(f"unknown training option(s) {', '.join(map(repr, unknown))}; valid: "
                              f"{', '.join(option_keys())} (a section also as a dict, e.g. model={{'width': 16}})")
    return {k: _as_flag(k, v) for k, v in flat.items() if v is not None}


def _as_flag(key: str, value: Any) -> Any:
    """``value`` as the CLI's flag would give it, so that config.json is the same: a path as text, an
    int where the rule wants a float as that float (JSON ``5.0``, not ``5``), a list as a tuple."""
    if isinstance(value, PurePath):
        return str(value)
    if rule_of(key).kind == "float":
        if _is_int(value):
            return float(value)
        if isinstance(value, (list, tuple)):
            return tuple(float(v) if _is_int(v) else v for v in value)
    return tuple(value) if isinstance(value, list) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resume_config(out: Path, config: str | Path | None, task: str | None, resume: bool) -> str | Path | None:
    """A resumed run without ``config`` continues with its own config.json; another ``task`` is refused."""
    if not (resume and (out / "config.json").is_file() and config is None):
        return config
    saved = config_mod.read_json_object(out / "config.json").get("task", TrainConfig.task)  # clear errors
    if task and task != saved:
        raise MedanomalyError(f"{out} holds a '{saved}' run; it cannot be resumed as '{task}': drop --task, or "
                              "train the other task into a new --out")
    return out / "config.json"


def _global_batch(cfg: TrainConfig, batch_given: bool, resume: bool, world: int) -> TrainConfig:
    """``cfg`` with a planned or default batch rounded up to a multiple of the ``world`` processes
    (a given batch_size is the global batch, split evenly among them; it must divide)."""
    if cfg.batch_size % world and not batch_given and not resume:
        cfg = config_mod.with_changes(cfg, batch_size=-(-cfg.batch_size // world) * world)
        log.info("global batch rounded up to %d, a multiple of the %d processes", cfg.batch_size, world)
    distributed.check_batch(cfg.batch_size)
    return cfg


def train(data: str | Path, out: str | Path, *, max_minutes: float | None = None, task: str | None = None,
          device: str = "auto", splits: str | Path | None = None, config: str | Path | None = None,
          plan: str | Path | bool = True, resume: bool = False, progress: bool = True, **options: Any) -> Model:
    """Train on the image/mask pairs (or normal images) in ``data`` and write the finished model
    directory ``out``, exactly as ``medanomaly train`` does; returns it as a :class:`Model`.

    Settings: the defaults (TrainConfig) < the plan < the ``config`` JSON file < ``max_minutes``,
    ``task`` and ``options``. ``options`` are TrainConfig keys (:func:`option_keys`: ``size=96``,
    ``epochs=10``, ``model={"width": 16}``); an unknown one is a MedanomalyError naming the valid ones.
    ``plan``: True plans from the data and this machine (:func:`plan`), False uses the defaults alone,
    a path uses a saved plan file; the plan used is saved as ``out/plan.json``. ``resume`` continues an
    interrupted run in ``out`` (with its own config.json). ``device``: auto, cpu, cuda, cuda:N or mps.
    ``splits``: a JSON file of train/val/test case ids (default DATA/splits.json, else a seeded split).
    Under torchrun every process calls it; each returns the finished model."""
    data, out = Path(data), Path(out)
    given = _overrides({**options, "max_minutes": max_minutes, "task": task})
    config = _resume_config(out, config, task, resume)
    config_mod.load(config, given)  # the config file and options checked before the plan reads the data
    info = distributed.init_from_env(device)  # under torchrun: join the other processes (data parallel)
    chosen, overrides = None, given
    if plan is not False and not resume:  # a resumed run keeps its config
        plan_file = None if plan is True else Path(plan)
        chosen, overrides = distributed.broadcast_object(  # rank 0 plans; all processes train the same plan
            planning.for_run(data, splits, plan_file, config, given, device) if distributed.is_main() else None)
    cfg = _global_batch(config_mod.load(config, overrides), "batch_size" in given, resume, info.world_size)
    res, calibration_s = _train_and_calibrate(data, out, cfg, splits, resume, info.device, progress)
    if chosen is not None and distributed.is_main():
        planning.save_plan(chosen, out / "plan.json")
    return Model(out, device=info.device, timings={"training_s": round(res.seconds, 2),
                                                   "calibration_s": round(calibration_s, 2)})


def _train_and_calibrate(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None,
                         resume: bool, device: str, progress: bool) -> tuple[TrainResult, float]:
    """:func:`train_with_config`, and the seconds calibration took (0 on the processes that wait)."""
    res = _train_run(data, out, cfg, splits_file, resume=resume, device=device, progress=progress)
    seconds = 0.0
    if distributed.is_main():
        with run_log(Path(res.out_dir) / "train.log"):  # the calibration's lines belong to the run's log too
            start = time.perf_counter()
            calibrate_and_save(res.out_dir, res.cfg, Path(data), res.in_channels, res.best_epoch,
                               res.best_val_score, device=torch.device(device), progress=progress)
            seconds = time.perf_counter() - start
            log.info("time: training %.1f s, calibration %.1f s", res.seconds, seconds)
    distributed.barrier()
    return res, seconds


def train_with_config(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
                      resume: bool = False, device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train with exactly ``cfg`` (no plan: what benchmarks and tests that fix every setting call)
    and calibrate, writing the finished model directory ``out``. Everything the options and the
    data listing allow is checked before any image is loaded (:func:`medanomaly.train.run.check_run`);
    ``model.json`` is written last, once calibrated. Under torchrun rank 0 calibrates (on the
    weights of the best epoch, read back from model.pt) while the other processes wait."""
    return _train_and_calibrate(data, out, cfg, splits_file, resume, device, progress)[0]


def calibrate(model_dir: str | Path, data: str | Path, device: str = "cpu", overwrite: bool = False,
              progress: bool = True) -> PostprocessParams:
    """Calibrate the trained network of ``model_dir`` on the val split of ``data`` (the folder it was
    trained on) and write its model.json: completes a run whose calibration was interrupted or
    failed; replaces the model file of a finished one only with ``overwrite``."""
    return calibrate_model(model_dir, data, str(resolve_device(device)), overwrite, progress)


def plan(data: str | Path, *, max_minutes: float = TrainConfig.max_minutes, task: str | None = None,
         device: str = "auto", splits: str | Path | None = None) -> Plan:
    """The training plan ``train`` would make for ``data`` on this machine within ``max_minutes``
    of training: input size, batch, network, epochs, normalisation, each with its reason
    (``print(p.table())``; ``p.to_config_overrides()`` as TrainConfig keys). ``task`` None:
    supervised when ``data`` has masks, else anomaly."""
    if task is not None and task not in TASKS:
        raise MedanomalyError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    config_mod.load(None, {"max_minutes": max_minutes})  # its rule: a clear error for a bad budget
    task = task or ("supervised" if any(s.mask is not None for s in discover(data)) else "anomaly")
    fp = planning.fingerprint(data, splits, labelled_only=task == "supervised")  # what the task trains on
    return planning.make_plan(fp, planning.machine(device), max_minutes, task)


def predict(model: Model | str | Path, inputs: str | Path | list[str | Path], out: str | Path, *,
            device: str = "auto", overwrite: bool = False, progress: bool = True, runtime: str = "torch",
            dicom_seg: bool = True, naming: str = "medanomaly") -> dict:
    """Predict every image below ``inputs`` (files, folders, DICOM series folders, CSV listings)
    with ``model`` (a :class:`Model` or a model directory) and write masks and score maps into
    ``out``, as ``medanomaly predict`` does; bad files are reported, not fatal. Returns
    ``{"n_ok": int, "failed": [{"input": str, "error": str}], "out": str}``. ``runtime``: torch or
    onnx (MODEL/model.onnx, CPU); ``naming``: medanomaly or nnunet. Under torchrun each process
    predicts a share of the files."""
    paths = [inputs] if isinstance(inputs, (str, PurePath)) else list(inputs)
    info = distributed.init_from_env("cpu" if runtime == "onnx" and device == "auto" else device, backend="gloo")
    return predict_paths(_model_dir(model), paths, out, info.device, overwrite, progress=progress, runtime=runtime,
                         dicom_seg=dicom_seg, naming=naming)


def evaluate(model_or_pred: Model | str | Path, data: str | Path, out: str | Path, *, split: str | None = None,
             splits: str | Path | None = None, device: str = "auto", progress: bool = True, overwrite: bool = False,
             predictions: bool | None = None, labels: str | Sequence[tuple[int, str]] | None = None) -> dict:
    """Score a model, or a folder of predictions, on the labelled images of ``data`` and write
    summary.json, per-case results and report.html into ``out``; returns the summary dict
    (``dice_per_case_mean``, ``dice``, ``auroc``...). A model (a :class:`Model`, or a folder with
    model.json or config.json; ``predictions=True`` says it is predictions) is scored on its test
    split by default, predictions on every image; ``split`` names another ('all': every image).
    ``labels`` (predictions only; ``"1=edema,2=enhancing"``, default: DATA/dataset.json's): label maps
    scored per label (summary ``labels``); a multi-label model scores its own labels."""
    which = None if split == "all" else split
    if predictions is None:
        predictions = not isinstance(model_or_pred, Model) and not any(
            (Path(model_or_pred) / name).is_file() for name in ("model.json", "config.json"))
    if predictions:
        return evaluate_predictions(_model_dir(model_or_pred), data, out, split=which, splits_file=splits,
                                    progress=progress, overwrite=overwrite, labels=labels)
    if labels:
        raise MedanomalyError("--labels is for scoring predictions (--pred); a model scores the labels it was "
                              "trained on (its model.json 'labels'): leave out --labels")
    return evaluate_model(_model_dir(model_or_pred), data, out, split="test" if split is None else which,
                          splits_file=splits, device=str(resolve_device(device)), progress=progress,
                          overwrite=overwrite)


def _model_dir(model: Model | str | Path) -> Path:
    return model.path if isinstance(model, Model) else Path(model)


def check_test_split(data: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None) -> None:
    """Before training for an evaluation on the test split (``demo --data``): the split of ``data``
    (``splits_file``, else DATA/splits.json, else the seeded split training makes) must leave
    labelled test images, else the evaluation would fail after the training minutes."""
    usable, split_ids = usable_and_splits(Path(data), cfg, splits_file)
    test = set(split_ids.get("test", []))
    if not any(s.case in test and s.mask is not None for s in usable):
        raise MedanomalyError(f"the split of {data} leaves no labelled test image (test cases: {len(test)}) for the "
                              "evaluation that follows training; add cases, or a splits.json with a 'test' list")


def as_image(image: Image | np.ndarray | str | Path) -> Image:
    """An :class:`~medanomaly.io.Image` from an Image, a file or DICOM series folder (read as
    ``predict`` reads it), or an array: (H, W) or (C, H, W), a 2D raster without spacing (uint8
    values are scaled as 8-bit files are)."""
    if isinstance(image, Image):
        return image
    if isinstance(image, (str, PurePath)):
        return read_image(image)
    a = np.asarray(image)
    if a.ndim not in (2, 3) or a.size == 0 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise MedanomalyError(f"an image array must be numeric, (H, W) or (C, H, W), not {a.dtype} {a.shape}; "
                              "pass a volume as a file path")
    geometry = Geometry("raster", (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False, meta={"dtype": str(a.dtype)})
    return Image((a[None] if a.ndim == 2 else a).astype(np.float32), geometry, Path("<array>"))


class Model:
    """A finished model directory (``train``'s result, or :meth:`load`): its settings, and prediction
    in memory. The network is loaded on the first :meth:`predict`. ``timings``: seconds of training
    and calibration when ``train`` returned it, else empty."""

    def __init__(self, path: str | Path, device: str = "auto", timings: dict[str, float] | None = None) -> None:
        self.path = Path(path)
        self.model_file: ModelFile = read_model_file(self.path)  # an unfinished directory: its completing command
        self.device = device
        self.timings = dict(timings or {})
        self._predictor: Predictor | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Model:
        """The model in the directory ``path`` (written by ``train``); ``device`` runs its predictions."""
        return cls(path, device)

    @property
    def config(self) -> TrainConfig:
        """The settings it was trained with."""
        return self.model_file.config

    @property
    def training(self) -> TrainingSummary:
        """Its best epoch and that epoch's validation score."""
        return self.model_file.training

    @property
    def postprocess(self) -> PostprocessParams:
        """Threshold and post-processing chosen on the validation split."""
        return self.model_file.postprocess

    def predict(self, image: Image | np.ndarray | str | Path) -> tuple[np.ndarray, np.ndarray]:
        """(mask, score) of one image (see :func:`as_image`), on its own grid, without writing files:
        ``mask`` bool after the post-processing chosen on val, ``score`` float32 probability (or
        anomaly score), both of the image's spatial shape ((H, W) or (Z, Y, X))."""
        if self._predictor is None:
            self._predictor = Predictor(self.path, str(resolve_device(self.device)))
        pred = self._predictor.predict(as_image(image))
        return pred.mask, pred.score

    def evaluate(self, data: str | Path, out: str | Path, **kwargs: Any) -> dict:
        """:func:`evaluate` of this model on ``data`` (its test split unless ``split`` says otherwise)."""
        return evaluate(self, data, out, **{"device": self.device, **kwargs})

    def __repr__(self) -> str:
        cfg = self.config
        return (f"Model({str(self.path)!r}: {cfg.task}, {cfg.model.dim}D, size {cfg.size}, best epoch "
                f"{self.training.best_epoch})")
