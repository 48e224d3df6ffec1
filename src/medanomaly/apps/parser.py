"""The arguments of every ``medanomaly`` command, as tables. Each ``choices`` is a tuple of
:mod:`medanomaly.config.options` and each "(default X)" in a help text is read from the config
dataclasses, so help, validation and behaviour cannot disagree; the settings that the planner
chooses say "chosen by the plan". CLI-only defaults (port, opset) are argparse's own and shown with
``%(default)s``. Every flag that takes a value is checked as it is parsed, before any work: a config
setting's flag by that setting's rule (:mod:`medanomaly.config.rules`), the others (paths, --device,
--port...) by the rules of :class:`Checked` below, a list by its ``choices``. Nothing here imports
torch, so ``--help`` and these errors stay fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medanomaly.apps.helptext import EXAMPLES, Formatter, examples, global_flags
from medanomaly.config.options import (
    ANOMALY_METHODS,
    DEFAULT_UNLABELLED_METHOD,
    DEVICE_NAMES,
    DEVICE_PATTERN,
    DIMS,
    ENCODERS,
    EXPORT_FORMATS,
    LOSSES,
    NAMINGS,
    NORMS,
    OPTIMIZERS,
    PRECISIONS,
    RUNTIMES,
    TASKS,
    UNLABELLED_METHODS,
)
from medanomaly.config.rules import ConfigError, Rule, item_rule, parse, rules_of
from medanomaly.config.schema import DEMO_MAX_MINUTES, TrainConfig, default, rule_of
from medanomaly.config.sections import GanConfig
from medanomaly.core.version import __version__

PLANNED = "(default: chosen by the plan)"  # train: the plan sets it (train/plan.py for_run), --no-plan the config

#: ``train`` flag (argparse dest) -> the TrainConfig key it overrides (None: not given)
TRAIN_KEYS = {
    "size": "size", "epochs": "epochs", "max_minutes": "max_minutes", "batch_size": "batch_size", "lr": "lr",
    "seed": "seed", "loss": "loss", "optimizer": "optimizer", "patience": "patience", "precision": "precision",
    "width": "model.width", "depth": "model.depth", "norm": "model.norm", "encoder": "model.encoder",
    "augment_enabled": "augment.enabled", "compile": "compile", "task": "task", "tta": "tta",
    "method": "anomaly.method", "noise_res": "anomaly.noise_res", "noise_std": "anomaly.noise_std",
    "target_fpr": "anomaly.target_fpr", "init": "init", "freeze_encoder_epochs": "freeze_encoder_epochs",
    "synthetic_lesions": "synthetic_lesions", "unlabelled": "unlabelled", "unlabelled_method": "unlabelled_method",
    "pretrain_share": "pretrain_share", "extra": "extra", "dim": "model.dim", "patch": "patch", "spacing": "spacing",
    "patches_per_epoch": "patches_per_epoch", "tensorboard": "tensorboard", "labels": "labels",
}
#: the --device help of every command that runs a network
DEVICE_HELP = f"{DEVICE_NAMES}; auto: the first GPU if there is one, else the CPU (default: auto)"


def shown(value: Any) -> str:
    """A default as help texts quote it: 25.0 -> 25, 0.002 -> 0.002, True -> on."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _d(key: str) -> str:
    """'(default X)' with X the TrainConfig default of ``key`` (dotted for the sections)."""
    return f"(default {shown(default(key))})"


def _gan(key: str) -> str:
    return f"(default {shown(getattr(GanConfig(), key))})"


class Checked:
    """An argparse ``type``: the text converted and checked by a rule of medanomaly.config.rules (the
    element rule of a list setting), so a bad value is argparse's error naming the flag (exit 2),
    before any work starts; ``then`` converts the checked value (e.g. to a Path)."""

    def __init__(self, rule: Rule, then: Callable[[Any], Any] | None = None) -> None:
        self.rule, self.then = item_rule(rule), then
        self.__name__ = rule.kind  # argparse names a type by it

    def __call__(self, text: str) -> Any:
        try:
            value = parse(self.rule, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return self.then(value) if self.then else value


def _k(key: str) -> Checked:
    """The type of a flag that sets TrainConfig ``key`` (dotted for the sections): its rule."""
    return Checked(rule_of(key))


def _g(key: str) -> Checked:
    """The type of a flag that sets GanConfig ``key``."""
    return Checked(rules_of(GanConfig)[key])


#: the types of the flags that are no config key (the configs' own flags check their keys' rules)
PATH_ARG = Checked(Rule("str", pattern=r"[^\x00]+", what="a non-empty path"), Path)
NAME = Checked(Rule("str", pattern=r"[^\x00]+", what="a non-empty name"))
DEVICE = Checked(Rule("str", pattern=DEVICE_PATTERN, what=DEVICE_NAMES))
HOST = Checked(Rule("str", pattern=r"[^\s\x00/]+", what="a host name or IP address"))
PORT = Checked(Rule("int", ge=0, le=65535))
OPSET = Checked(Rule("int", ge=13, le=20))
MEGABYTES = Checked(Rule("float", gt=0, le=10**7))
N_PAIRS = Checked(Rule("int", ge=1, le=10**6))


def _add_train_model(p: argparse.ArgumentParser) -> None:  # declarative
    p.add_argument("--size", type=_k("size"), help=f"input size in pixels per side {PLANNED}")
    p.add_argument("--epochs", type=_k("epochs"), help=f"maximum epochs {PLANNED}")
    p.add_argument("--max-minutes", type=_k("max_minutes"), help=f"training time budget in minutes {_d('max_minutes')}")
    p.add_argument("--batch-size", type=_k("batch_size"),
                   help=f"images per step, all torchrun processes together {PLANNED}")
    p.add_argument("--lr", type=_k("lr"), help=f"peak learning rate {_d('lr')}")
    p.add_argument("--seed", type=_k("seed"), help=f"random seed of weights, batches and augmentation {_d('seed')}")
    p.add_argument("--loss", choices=LOSSES, help=f"segmentation loss {_d('loss')}")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer {_d('optimizer')}")
    p.add_argument("--width", type=_k("model.width"), help=f"channels of the first U-Net level {PLANNED}")
    p.add_argument("--depth", type=_k("model.depth"), help=f"down-sampling steps {PLANNED}")
    p.add_argument("--norm", choices=NORMS, help=f"normalisation layers {PLANNED}")
    p.add_argument("--encoder", choices=ENCODERS,
                   help=f"U-Net encoder {_d('model.encoder')}: plain, or a ResNet-18/34 that --init loads torchvision "
                        "weights into (2D; grey images are repeated onto RGB; --depth is ignored)")
    p.add_argument("--dim", type=int, choices=DIMS, help=f"2: slices; 3: a 3D U-Net on patches of volumes "
                   f"(3D files, DICOM series, or each folder of ordered 2D slices stacked), sliding-window inference "
                   f"{_d('model.dim')}")
    p.add_argument("--patch", type=_k("patch"), nargs=3, metavar=("Z", "Y", "X"),
                   help="--dim 3: patch size in voxels at the target spacing (default: from the volumes, <= 64^3 "
                        "on a CPU)")
    p.add_argument("--spacing", type=_k("spacing"), nargs=3, metavar=("Z", "Y", "X"),
                   help="--dim 3: resample to this spacing in mm (voxels for stacked 2D slices; default: the median "
                        "spacing of the training volumes)")
    p.add_argument("--patches-per-epoch", type=_k("patches_per_epoch"),
                   help=f"--dim 3: patches drawn per epoch {_d('patches_per_epoch')}")
    p.add_argument("--patience", type=_k("patience"),
                   help=f"early stopping: epochs without improvement {_d('patience')}")
    p.add_argument("--precision", choices=PRECISIONS, help=f"bf16 autocast or fp32 {_d('precision')}")
    p.add_argument("--no-augment", dest="augment_enabled", action="store_false", default=None,
                   help="turn augmentation off (default: on: flips, rotation, scaling, elastic, intensity)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training network (Inductor): about 18%% more images/s at 128x128 on a "
                        "bf16 CPU after about a minute of compiling; 2D, one process, needs a C++ compiler")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="supervised: average the prediction with that of the left-right flipped image; off by default")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write TensorBoard event files (losses, validation score, learning rate per epoch) into "
                        "OUT/tensorboard; needs the tensorboard package; off by default (OUT/train.log and "
                        "OUT/progress.png are always written)")


def _add_train_task(p: argparse.ArgumentParser) -> None:  # declarative
    p.add_argument("--task", choices=TASKS, help="supervised: learn lesions from image + mask pairs; anomaly: learn "
                   f"normal anatomy from normal images {_d('task')}")
    p.add_argument("--method", choices=ANOMALY_METHODS,
                   help=f"anomaly task {_d('anomaly.method')}: denoise (coarse-noise denoising U-Net), identity "
                        "(no-noise ablation), intensity (no network: the normalised intensity is the score), "
                        "synthetic (segment anomalies pasted into normal images, as FPI/DRAEM)")
    p.add_argument("--noise-res", type=_k("anomaly.noise_res"),
                   help=f"anomaly: coarse noise grid per side {_d('anomaly.noise_res')}")
    p.add_argument("--noise-std", type=_k("anomaly.noise_std"),
                   help=f"anomaly: noise strength, normalised intensity units {_d('anomaly.noise_std')}")
    p.add_argument("--target-fpr", type=_k("anomaly.target_fpr"),
                   help="anomaly: label-free threshold at this pixel false-positive rate on normal val images "
                        f"{_d('anomaly.target_fpr')}")
    p.add_argument("--labels", type=_k("labels"), metavar="V=NAME,...",
                   help="supervised 2D: the lesion labels of the masks, e.g. 1=edema,2=enhancing,3=necrosis: one "
                        "output per label (softmax), label-map predictions (default: DATA/dataset.json 'labels', "
                        "else one lesion label, any mask value > 0)")
    p.add_argument("--init", type=_k("init"),
                   help="start from local weights: a medanomaly model directory (e.g. from 'pretrain') "
                        "or a .pt state dict; matching tensors are loaded, the others listed")
    p.add_argument("--freeze-encoder-epochs", type=_k("freeze_encoder_epochs"),
                   help=f"with --init: train only the decoder at first {_d('freeze_encoder_epochs')}")
    p.add_argument("--unlabelled", type=_k("unlabelled"), metavar="DIR_OR_SPLIT",
                   help="supervised: also learn from images without masks (a folder, or the name of a list of "
                        "case ids in the split file), by --unlabelled-method")
    p.add_argument("--unlabelled-method", choices=UNLABELLED_METHODS,
                   help="with --unlabelled: pretrain (denoising pretraining on labelled + unlabelled images for "
                        "--pretrain-share of the budget, then fine-tune), mean-teacher (EMA teacher, consistency "
                        f"loss), or both; auto: the remedy measured best with few labels, {DEFAULT_UNLABELLED_METHOD} "
                        f"(README) {_d('unlabelled_method')}")
    p.add_argument("--pretrain-share", type=_k("pretrain_share"),
                   help=f"with --unlabelled and pretrain: share of --max-minutes spent pretraining "
                        f"{_d('pretrain_share')}")
    p.add_argument("--synthetic-lesions", type=_k("synthetic_lesions"), metavar="P",
                   help="supervised: paste a synthetic lesion (shape random, intensity and texture from the real "
                        "training lesions) into a lesion-free training sample with probability P")
    p.add_argument("--extra", type=PATH_ARG, metavar="DIR",
                   help="supervised: add the image/mask pairs of DIR (e.g. from 'medanomaly synthesize') to the "
                        "training split only; they must be --size x --size with the training images' channels")


def _add_train(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("train", help="train a U-Net on image + mask pairs",
                       description="Train a U-Net; writes a model directory (weights, config, chosen threshold).")
    p.add_argument("data", type=PATH_ARG, help="folder of images and masks, or a CSV listing of their paths "
                   "(see README, 'Data layouts')")
    p.add_argument("--out", type=PATH_ARG, required=True,
                   help="model directory to write (new or empty; weights, model.json, train.log, progress.png)")
    p.add_argument("--config", type=PATH_ARG, help="JSON file with TrainConfig values (flags override it)")
    p.add_argument("--splits", type=PATH_ARG, help="JSON with train/val/test case ids (default: DATA/splits.json, "
                                               "else a seeded split by case)")
    _add_train_model(p)
    _add_train_task(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", type=PATH_ARG, metavar="PLAN_JSON", help="use this plan from 'medanomaly plan' (default: "
                   "one is made from DATA and this machine); --config and flags override its settings")
    g.add_argument("--no-plan", action="store_true", help="no plan: the built-in defaults (see README, 'train')")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("pretrain", help="self-supervised pretraining on images alone (masks ignored)",
                       description="Learn from images alone with the coarse-noise denoising objective (masks, if "
                                   "present, are ignored). Writes a model directory that 'train --init' takes.")
    p.add_argument("data", type=PATH_ARG, help="folder of images (masks, if any, are ignored)")
    p.add_argument("--out", type=PATH_ARG, required=True,
                   help="model directory to write (new or empty; weights, model.json, train.log, progress.png)")
    p.add_argument("--splits", type=PATH_ARG,
                   help="split file (default: DATA/splits.json, else a seeded split by case)")
    p.add_argument("--size", type=_k("size"), help=f"input size in pixels per side (no plan) {_d('size')}")
    p.add_argument("--epochs", type=_k("epochs"), help=f"maximum epochs (no plan) {_d('epochs')}")
    p.add_argument("--max-minutes", type=_k("max_minutes"),
                   help=f"training time budget in minutes (no plan) {_d('max_minutes')}")
    p.add_argument("--batch-size", type=_k("batch_size"), help=f"images per step (no plan) {_d('batch_size')}")
    p.add_argument("--width", type=_k("model.width"),
                   help=f"channels of the first U-Net level (no plan) {_d('model.width')}")
    p.add_argument("--depth", type=_k("model.depth"), help=f"down-sampling steps (no plan) {_d('model.depth')}")
    p.add_argument("--encoder", choices=ENCODERS, help=f"U-Net encoder (see 'train --help') {_d('model.encoder')}")
    p.add_argument("--seed", type=_k("seed"), help=f"random seed (no plan) {_d('seed')}")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)


def _add_predict(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("predict", help="masks, score maps and overlays for new images",
                       description="Predict every image of the inputs (files, folders, DICOM series folders).")
    p.add_argument("model", type=PATH_ARG, help="model directory written by 'medanomaly train'")
    p.add_argument("inputs", type=PATH_ARG, nargs="+",
                   help="image files, folders (recursive), DICOM series folders or CSV listings (an 'image' column)")
    p.add_argument("--out", type=PATH_ARG, required=True, help="output folder (mirrors the input tree)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier predictions in --out")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)
    p.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                   help="run the network with PyTorch (default) or with ONNX Runtime on MODEL/model.onnx "
                        "(CPU, fp32; create it with 'medanomaly export MODEL')")
    p.add_argument("--naming", choices=NAMINGS, default=NAMINGS[0],
                   help="output names: medanomaly (default: STEM_pred.EXT mask, STEM_score.EXT, STEM_overlay.png) or "
                        "nnunet (CASE.EXT label maps only, 0/1, CASE being the file name without _0000, as nnU-Net "
                        "writes them)")
    p.add_argument("--dicom-seg", action=argparse.BooleanOptionalAction, default=True,
                   help="for DICOM series inputs, also write STEM_seg.dcm: the mask as a DICOM SEG referencing the "
                        "series (on by default). It keeps the patient module (name, ID, birth date, sex) and the study "
                        "identifiers, which archives need to file it next to the study, and nothing more; "
                        "--no-dicom-seg leaves it out when results are to be shared")


def _add_export(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("export", help="export a model's network to ONNX for other runtimes",
                       description="Export the network of a model directory to ONNX (fp32, NCHW input 'image' with a "
                                   "dynamic batch axis), with a JSON sidecar FILE.json describing the pre- and "
                                   "post-processing. The file is checked against PyTorch with ONNX Runtime.")
    p.add_argument("model", type=PATH_ARG, help="model directory written by 'medanomaly train'")
    p.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help="export format (default: %(default)s)")
    p.add_argument("--out", type=PATH_ARG, default=None, help="output file (default: MODEL/model.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its .json sidecar")
    p.add_argument("--opset", type=OPSET, default=17, help="ONNX opset version, 13..20 (default: %(default)s)")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("calibrate", help="choose a trained model's threshold and post-processing on its val split",
                       description="Run the calibration of 'train' again on the trained network of MODEL: the "
                                   "threshold and post-processing (and the anomaly-map settings) chosen on the val "
                                   "split of MODEL/splits.json, written as MODEL/model.json. Completes a run whose "
                                   "calibration was interrupted or failed; a run whose training was interrupted is "
                                   "completed by 'train ... --resume' instead.")
    p.add_argument("model", type=PATH_ARG, help="model directory written by 'medanomaly train'")
    p.add_argument("--data", type=PATH_ARG, required=True, help="the data folder the model was trained on")
    p.add_argument("--overwrite", action="store_true", help="replace the model.json of a finished model directory")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("evaluate", help="score a model (or existing predictions) against masks",
                       description="Writes OUT/cases.csv, OUT/summary.json and OUT/report.html.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=PATH_ARG, help="model directory: predict, then score")
    src.add_argument("--pred", type=PATH_ARG, help="folder of predictions to score: STEM_pred.* files mirroring DATA (as "
                     "'predict' writes them) or CASE.* label maps (as nnU-Net and 'predict --naming nnunet' write them)")
    p.add_argument("--data", type=PATH_ARG, required=True,
                   help="folder with images and masks, or a CSV listing of their paths")
    p.add_argument("--split", type=NAME, default=None,
                   help="train, val, test or all (default: test with --model, all with --pred)")
    p.add_argument("--splits", type=PATH_ARG,
                   help="split file (default: the model's splits.json, else DATA/splits.json)")
    p.add_argument("--labels", type=_k("labels"), metavar="V=NAME,...",
                   help="with --pred: label maps scored per label, e.g. 1=edema,2=enhancing (default: DATA/dataset.json "
                        "'labels' if several, else binary: any value > 0 is lesion); a --model scores its own labels")
    p.add_argument("--out", type=PATH_ARG, required=True, help="output folder, outside DATA, MODEL and PRED")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)


def _add_demo(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("demo", help="train, predict, evaluate and report on a built-in synthetic set or --data",
                       description="End-to-end run. Without --data it generates labelled synthetic phantoms.")
    p.add_argument("--out", type=PATH_ARG, default=Path("demo-out"), help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo's results in --out (its trained model is reused)")
    p.add_argument("--data", type=PATH_ARG, help="a real data folder instead of the synthetic phantoms")
    p.add_argument("--max-minutes", type=_k("max_minutes"),
                   help=f"training budget in minutes (default {shown(DEMO_MAX_MINUTES)} for the phantoms, "
                        f"{shown(default('max_minutes'))} for --data)")
    p.add_argument("--seed", type=_k("seed"), default=default("seed"), help=f"random seed {_d('seed')}")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)


def _add_serve(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("serve", help="a local web viewer: upload an image, see its heat map, mask and regions",
                       description="Start a local web app for one model: upload an image (PNG, JPEG, TIFF, NIfTI, a "
                                   "DICOM file or a zipped DICOM series), see it with the heat map overlaid, move the "
                                   "threshold, scroll through slices and download the mask. Uploads are deleted once "
                                   "analysed; score maps stay in memory for the last 8 uploads.")
    p.add_argument("model", type=PATH_ARG, help="model directory written by 'medanomaly train'")
    p.add_argument("--host", type=HOST, default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only). Anything else exposes the "
                        "viewer, without login or encryption, to the network")
    p.add_argument("--port", type=PORT, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=MEGABYTES, default=200,
                   help="largest upload accepted, in MB (default: %(default)s)")
    p.add_argument("--max-memory-mb", type=MEGABYTES, default=None,
                   help="memory that analyses may hold at once, in MB, estimated from each upload's declared image "
                        "size; over it uploads are answered 503 'busy' (default: half the available memory)")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)


def _add_synthesize(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("synthesize", help="train a lesion generator (GAN) and write synthetic image/mask pairs",
                       description="Train a small mask-conditioned generator (pix2pix-style: lesion mask + image with "
                                   "the lesion region erased -> image) on the train split of DATA, then paint N "
                                   "lesions, from real training masks moved to a new place, into lesion-free training "
                                   "slices. Writes DIR/images/synthetic_NNNNN.png, DIR/masks/synthetic_NNNNN.png, "
                                   "DIR/manifest.json and DIR/generator.pt; 'train --extra DIR' uses them.")
    p.add_argument("data", type=PATH_ARG, help="folder of images and masks (see README, 'Data layouts')")
    p.add_argument("--out", type=PATH_ARG, required=True, help="output folder (new or empty, outside DATA)")
    p.add_argument("--n", type=N_PAIRS, required=True, help="number of synthetic pairs to write")
    p.add_argument("--size", type=_g("size"),
                   help=f"pixels per side of training and of the written pairs {_gan('size')}")
    p.add_argument("--max-minutes", type=_g("minutes"), help=f"GAN training time budget in minutes {_gan('minutes')}")
    p.add_argument("--max-steps", type=_g("max_steps"), help=f"GAN training steps at most {_gan('max_steps')}")
    p.add_argument("--batch-size", type=_g("batch_size"), help=f"GAN batch size {_gan('batch_size')}")
    p.add_argument("--width", type=_g("width"), help=f"generator U-Net width {_gan('width')}")
    p.add_argument("--seed", type=_g("seed"), help=f"random seed {_gan('seed')}")
    p.add_argument("--splits", type=PATH_ARG,
                   help="split file (default: DATA/splits.json, else a seeded split by case)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synthesize output in --out")
    p.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)


def _add_plan(sub: argparse._SubParsersAction) -> None:  # declarative
    p = sub.add_parser("plan", help="derive training settings from the data and this machine",
                       description="Fingerprint DATA (sizes, spacing, channels, intensities, lesion share) and this "
                                   "machine (cores, memory, GPU); print the plan (setting | value | why) and write it "
                                   "as JSON for 'train --plan' ('train' makes the same plan itself by default).")
    p.add_argument("data", type=PATH_ARG, help="folder of images (and masks), or a CSV listing of their paths")
    p.add_argument("--out", type=PATH_ARG, default=Path("plan.json"),
                   help="plan file to write, or a folder to write plan.json into (default: ./plan.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    p.add_argument("--max-minutes", type=_k("max_minutes"), default=TrainConfig.max_minutes,
                   help=f"training time budget to plan for {_d('max_minutes')}")
    p.add_argument("--task", choices=TASKS, help="default: supervised when DATA has masks, else anomaly")
    p.add_argument("--splits", type=PATH_ARG,
                   help="split file (default: DATA/splits.json, else a seeded split by case)")
    p.add_argument("--device", type=DEVICE, default="auto", help="plan for cpu, cuda, cuda:1 or auto (default)")


def build_parser() -> argparse.ArgumentParser:
    """The ``medanomaly`` parser: global flags and one sub-parser per command (``args.command``),
    each command's help ending with examples (:data:`EXAMPLES`)."""
    parser = argparse.ArgumentParser(prog="medanomaly", description="Find abnormal regions in medical images.",
                                     epilog=examples(EXAMPLES["train"][:1] + EXAMPLES["predict"][:1]),
                                     formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"medanomaly {__version__}")
    global_flags(parser, here=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; 'medanomaly COMMAND --help' tells more")
    for add in (_add_train, _add_pretrain, _add_predict, _add_evaluate, _add_demo, _add_export, _add_serve,
                _add_synthesize, _add_plan, _add_calibrate):
        add(sub)
    for name, p in sub.choices.items():
        global_flags(p, here=False)
        p.formatter_class = Formatter
        p.epilog = examples(EXAMPLES[name])
    return parser
