"""The ``medanomaly`` command: train, predict, evaluate, demo, export.

Every user error ends as one paragraph on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__

log = logging.getLogger("medanomaly")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a U-Net on image + mask pairs",
                       description="Train a U-Net; writes a model directory (weights, config, chosen threshold).")
    p.add_argument("data", type=Path, help="folder of images and masks (see README, 'Data layouts')")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--config", type=Path, help="JSON file with TrainConfig values (flags override it)")
    p.add_argument("--splits", type=Path, help="JSON with train/val/test case ids (default: DATA/splits.json, "
                                               "else a seeded split by case)")
    p.add_argument("--size", type=int, help="input size in pixels per side (default 128)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 100)")
    p.add_argument("--max-minutes", type=float, help="training time budget in minutes (default 25)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=["bce", "dice", "bce+dice"])
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    p.add_argument("--width", type=int, help="channels of the first U-Net level (default 32)")
    p.add_argument("--depth", type=int, help="down-sampling steps (default 4)")
    p.add_argument("--norm", choices=["batch", "instance", "group", "none"])
    p.add_argument("--encoder", choices=["plain", "resnet18", "resnet34"],
                   help="U-Net encoder: plain (default) or a ResNet-18/34 that --init loads torchvision weights into "
                        "(2D; grey images are repeated onto RGB; --depth is ignored)")
    p.add_argument("--dim", type=int, choices=[2, 3], help="2: slices (default); 3: a 3D U-Net on patches of volumes "
                   "(3D files, DICOM series, or each folder of ordered 2D slices stacked), sliding-window inference")
    p.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="--dim 3: patch size in voxels at the target spacing (default: from the volumes, <= 64^3 on a CPU)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="--dim 3: resample to this spacing in mm (voxels for stacked 2D slices; default: the median "
                        "spacing of the training volumes)")
    p.add_argument("--patches-per-epoch", type=int, help="--dim 3: patches drawn per epoch (default 250)")
    p.add_argument("--patience", type=int, help="early stopping: epochs without improvement (default 15)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--no-augment", action="store_true", help="turn augmentation off")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training network (Inductor): about 18%% more images/s at 128x128 on a "
                        "bf16 CPU after about a minute of compiling; 2D, one process, needs a C++ compiler")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="supervised: average the prediction with that of the left-right flipped image")
    p.add_argument("--task", choices=["supervised", "anomaly"],
                   help="supervised (image + mask pairs, default) or anomaly (learn normal anatomy from normal images)")
    p.add_argument("--method", choices=["denoise", "identity", "intensity", "synthetic"],
                   help="anomaly task: denoise (coarse-noise denoising U-Net, default), identity (no-noise "
                        "ablation), intensity (no network: the normalised intensity is the score), synthetic "
                        "(segment anomalies pasted into normal images, as FPI/DRAEM)")
    p.add_argument("--noise-res", type=int, help="anomaly: coarse noise grid per side (default 16)")
    p.add_argument("--noise-std", type=float, help="anomaly: noise strength, normalised intensity units (default 0.2)")
    p.add_argument("--target-fpr", type=float,
                   help="anomaly: label-free threshold at this pixel false-positive rate on normal val images (default 0.01)")
    p.add_argument("--init", help="start from local weights: a medanomaly model directory (e.g. from 'pretrain') "
                                   "or a .pt state dict; matching tensors are loaded, the others listed")
    p.add_argument("--freeze-encoder-epochs", type=int, help="with --init: train only the decoder at first")
    p.add_argument("--unlabelled", metavar="DIR_OR_SPLIT",
                   help="supervised: also learn from images without masks (a folder, or the name of a list of "
                        "case ids in the split file), by --unlabelled-method")
    p.add_argument("--unlabelled-method", choices=["auto", "mean-teacher", "pretrain", "pretrain+mean-teacher"],
                   help="with --unlabelled: pretrain (denoising pretraining on labelled + unlabelled images for "
                        "--pretrain-share of the budget, then fine-tune), mean-teacher (EMA teacher, consistency "
                        "loss), or both; auto (default): the remedy measured best with few labels (README)")
    p.add_argument("--pretrain-share", type=float, help="with --unlabelled and pretrain: share of --max-minutes "
                   "spent pretraining (default 0.3)")
    p.add_argument("--synthetic-lesions", type=float, metavar="P",
                   help="supervised: paste a synthetic lesion (shape random, intensity and texture from the real "
                        "training lesions) into a lesion-free training sample with probability P")
    p.add_argument("--extra", type=Path, metavar="DIR",
                   help="supervised: add the image/mask pairs of DIR (e.g. from 'medanomaly synthesize') to the "
                        "training split only; they must be --size x --size with the training images' channels")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plan", type=Path, metavar="PLAN_JSON", help="use this plan from 'medanomaly plan' (default: "
                   "one is made from DATA and this machine); --config and flags override its settings")
    g.add_argument("--no-plan", action="store_true", help="no plan: the built-in defaults (see README, 'train')")


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining on images alone (masks ignored)",
                       description="Learn from images alone with the coarse-noise denoising objective (masks, if "
                                   "present, are ignored). Writes a model directory that 'train --init' takes.")
    p.add_argument("data", type=Path, help="folder of images (masks, if any, are ignored)")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--splits", type=Path, help="split file (default: DATA/splits.json, else a seeded split by case)")
    p.add_argument("--size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--encoder", choices=["plain", "resnet18", "resnet34"], help="U-Net encoder (see 'train --help')")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="masks, score maps and overlays for new images",
                       description="Predict every image of the inputs (files, folders, DICOM series folders).")
    p.add_argument("model", type=Path, help="model directory written by 'medanomaly train'")
    p.add_argument("inputs", type=Path, nargs="+", help="image files, folders (recursive) or DICOM series folders")
    p.add_argument("--out", type=Path, required=True, help="output folder (mirrors the input tree)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier predictions in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="run the network with PyTorch (default) or with ONNX Runtime on MODEL/model.onnx "
                        "(CPU, fp32; create it with 'medanomaly export MODEL')")
    p.add_argument("--dicom-seg", action=argparse.BooleanOptionalAction, default=True,
                   help="for DICOM series inputs, also write STEM_seg.dcm: the mask as a DICOM SEG referencing the "
                        "series (default on). It carries only the patient and study identifiers the standard "
                        "requires to reference its source; --no-dicom-seg leaves it out")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model's network to ONNX for other runtimes",
                       description="Export the network of a model directory to ONNX (fp32, NCHW input 'image' with a "
                                   "dynamic batch axis), with a JSON sidecar FILE.json describing the pre- and "
                                   "post-processing. The file is checked against PyTorch with ONNX Runtime.")
    p.add_argument("model", type=Path, help="model directory written by 'medanomaly train'")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: MODEL/model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version, 13..20 (default: 17)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model (or existing predictions) against masks",
                       description="Writes OUT/cases.csv, OUT/summary.json and OUT/report.html.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="model directory: predict, then score")
    src.add_argument("--pred", type=Path, help="folder of *_pred.* files (mirroring DATA) to score")
    p.add_argument("--data", type=Path, required=True, help="folder with images and masks")
    p.add_argument("--split", default=None, help="train, val, test or all (default: test with --model, all with --pred)")
    p.add_argument("--splits", type=Path, help="split file (default: the model's splits.json, else DATA/splits.json)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train, predict, evaluate and report on a built-in synthetic set or --data",
                       description="End-to-end run. Without --data it generates labelled synthetic phantoms.")
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--data", type=Path, help="a real data folder instead of the synthetic phantoms")
    p.add_argument("--max-minutes", type=float, help="training budget (default 2 for phantoms, 25 for --data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web viewer: upload an image, see its heat map, mask and regions",
                       description="Start a local web app for one model: upload an image (PNG, JPEG, TIFF, NIfTI, a "
                                   "DICOM file or a zipped DICOM series), see it with the heat map overlaid, move the "
                                   "threshold, scroll through slices and download the mask. Uploads are deleted once "
                                   "analysed; score maps stay in memory for the last 8 uploads.")
    p.add_argument("model", type=Path, help="model directory written by 'medanomaly train'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only). Anything else exposes the "
                        "viewer, without login or encryption, to the network")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=200, help="largest upload accepted, in MB (default 200)")
    p.add_argument("--device", default="auto")


def _add_synthesize(sub) -> None:
    p = sub.add_parser("synthesize", help="train a lesion generator (GAN) and write synthetic image/mask pairs",
                       description="Train a small mask-conditioned generator (pix2pix-style: lesion mask + image with "
                                   "the lesion region erased -> image) on the train split of DATA, then paint N "
                                   "lesions, from real training masks moved to a new place, into lesion-free training "
                                   "slices. Writes DIR/images/synthetic_NNNNN.png, DIR/masks/synthetic_NNNNN.png, "
                                   "DIR/manifest.json and DIR/generator.pt; 'train --extra DIR' uses them.")
    p.add_argument("data", type=Path, help="folder of images and masks (see README, 'Data layouts')")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty, outside DATA)")
    p.add_argument("--n", type=int, required=True, help="number of synthetic pairs to write")
    p.add_argument("--size", type=int, help="pixels per side of training and of the written pairs (default 128)")
    p.add_argument("--max-minutes", type=float, help="GAN training time budget in minutes (default 20)")
    p.add_argument("--max-steps", type=int, help="GAN training steps at most (default 100000)")
    p.add_argument("--batch-size", type=int, help="GAN batch size (default 8)")
    p.add_argument("--width", type=int, help="generator U-Net width (default 16)")
    p.add_argument("--seed", type=int)
    p.add_argument("--splits", type=Path, help="split file (default: DATA/splits.json, else a seeded split by case)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synthesize output in --out")
    p.add_argument("--device", default="auto")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="derive training settings from the data and this machine",
                       description="Fingerprint DATA (sizes, spacing, channels, intensities, lesion share) and this "
                                   "machine (cores, memory, GPU); print the plan (setting | value | why) and write it "
                                   "as JSON for 'train --plan' ('train' makes the same plan itself by default).")
    p.add_argument("data", type=Path, help="folder of images (and masks)")
    p.add_argument("--out", type=Path, default=Path("plan.json"),
                   help="plan file to write, or a folder to write plan.json into (default: ./plan.json)")
    p.add_argument("--max-minutes", type=float, help="training time budget to plan for (default 25)")
    p.add_argument("--task", choices=["supervised", "anomaly"],
                   help="default: supervised when DATA has masks, else anomaly")
    p.add_argument("--splits", type=Path, help="split file (default: DATA/splits.json, else a seeded split by case)")
    p.add_argument("--device", default="auto", help="plan for cpu, cuda, cuda:1 or auto (default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medanomaly", description="Find abnormal regions in medical images.")
    parser.add_argument("--version", action="version", version=f"medanomaly {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_pretrain, _add_predict, _add_evaluate, _add_demo, _add_export, _add_serve,
                _add_synthesize, _add_plan):
        add(sub)
    return parser


def cmd_train(args) -> int:
    from medanomaly.config import schema as config
    from medanomaly.core import distributed as distributed
    from medanomaly.apps.api import train

    info = distributed.init_from_env(args.device)  # under torchrun: join the other processes (data parallel)
    overrides = {"size": args.size, "epochs": args.epochs, "max_minutes": args.max_minutes,
                 "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "loss": args.loss,
                 "optimizer": args.optimizer, "patience": args.patience, "precision": args.precision,
                 "model.width": args.width, "model.depth": args.depth, "model.norm": args.norm,
                 "model.encoder": args.encoder,
                 "augment.enabled": False if args.no_augment else None, "compile": args.compile,
                 "task": args.task, "tta": args.tta,
                 "anomaly.method": args.method, "anomaly.noise_res": args.noise_res,
                 "anomaly.noise_std": args.noise_std, "anomaly.target_fpr": args.target_fpr,
                 "init": str(args.init) if args.init else None, "freeze_encoder_epochs": args.freeze_encoder_epochs,
                 "synthetic_lesions": args.synthetic_lesions,
                 "unlabelled": str(args.unlabelled) if args.unlabelled else None,
                 "unlabelled_method": args.unlabelled_method, "pretrain_share": args.pretrain_share,
                 "extra": str(args.extra) if args.extra else None,
                 "model.dim": args.dim, "patch": tuple(args.patch) if args.patch else None,
                 "spacing": tuple(args.spacing) if args.spacing else None, "patches_per_epoch": args.patches_per_epoch}
    if args.resume and (args.out / "config.json").is_file() and args.config is None:
        args.config = args.out / "config.json"  # resume with the run's own configuration
        saved = json.loads(args.config.read_text()).get("task", "supervised")
        if args.task and args.task != saved:
            raise MedanomalyError(f"{args.out} holds a '{saved}' run; it cannot be resumed as '{args.task}': "
                                  "drop --task, or train the other task into a new --out")
    plan = None
    if not (args.resume or args.no_plan):  # defaults < plan < --config < flags; a resumed run keeps its config
        from medanomaly.train import plan as planning

        plan, overrides = distributed.broadcast_object(  # rank 0 plans; all processes train the same plan
            planning.for_run(args.data, args.splits, args.plan, args.config, overrides, args.device)
            if distributed.is_main() else None)
    cfg = config.load(args.config, overrides)
    world = info.world_size
    if cfg.batch_size % world and args.batch_size is None and not args.resume:  # a planned/default batch
        cfg = config.with_changes(cfg, batch_size=-(-cfg.batch_size // world) * world)
        log.info("global batch rounded up to %d, a multiple of the %d processes", cfg.batch_size, world)
    distributed.check_batch(cfg.batch_size)  # --batch-size is the global batch, split evenly among processes
    res = train(args.data, args.out, cfg, args.splits, resume=args.resume, device=info.device, progress=not args.quiet)
    if not distributed.is_main():
        return 0
    if plan is not None:
        planning.save_plan(plan, res.out_dir / "plan.json")
    _say(f"model written to {res.out_dir} (best epoch {res.best_epoch}, val score {res.best_val_score:.4f}, "
         f"{res.seconds / 60:.1f} min)")
    return 0


def cmd_plan(args) -> int:
    from medanomaly.config.schema import TrainConfig
    from medanomaly.data.slices import discover
    from medanomaly.train import plan as planning

    task = args.task or ("supervised" if any(s.mask is not None for s in discover(args.data)) else "anomaly")
    fp = planning.fingerprint(args.data, args.splits, labelled_only=task == "supervised")  # what the task trains on
    minutes = TrainConfig.max_minutes if args.max_minutes is None else args.max_minutes
    plan = planning.make_plan(fp, planning.machine(args.device), minutes, task)
    out = planning.save_plan(plan, args.out / "plan.json" if args.out.is_dir() else args.out)
    _say(plan.table())
    _say(f"plan written to {out}; use it with 'medanomaly train {args.data} --plan {out} --out MODEL_DIR'")
    return 0


def cmd_pretrain(args) -> int:
    from medanomaly.config import schema as config
    from medanomaly.core.runtime import resolve_device
    from medanomaly.apps.api import train

    cfg = config.load(None, {"task": "anomaly", "anomaly.method": "denoise", "anomaly.normal_only": False,
                             "size": args.size, "epochs": args.epochs, "max_minutes": args.max_minutes,
                             "batch_size": args.batch_size, "model.width": args.width, "model.depth": args.depth,
                             "model.encoder": args.encoder, "seed": args.seed})
    res = train(args.data, args.out, cfg, args.splits, device=str(resolve_device(args.device)), progress=not args.quiet)
    _say(f"pretrained model written to {res.out_dir} ({res.seconds / 60:.1f} min); use it with "
         f"'medanomaly train DATA --init {res.out_dir}'")
    return 0


def cmd_predict(args) -> int:
    from medanomaly.core import distributed as distributed
    from medanomaly.infer.predictor import predict_paths

    # under torchrun each process predicts a share of the files (gloo: only the results are exchanged)
    info = distributed.init_from_env("cpu" if args.runtime == "onnx" and args.device == "auto" else args.device,
                                     backend="gloo")
    res = predict_paths(args.model, args.inputs, args.out, info.device, args.overwrite, progress=not args.quiet,
                        runtime=args.runtime, dicom_seg=args.dicom_seg)
    if not distributed.is_main():  # rank 0 reports (and its exit code says whether a file failed)
        return 0
    _say(f"{res['n_ok']} images predicted into {res['out']}")
    for f in res["failed"]:
        _say(f"failed: {f['input']}: {f['error']}", err=True)
    return 1 if res["failed"] else 0


def cmd_export(args) -> int:
    from medanomaly.infer.export import export_onnx, sidecar_path

    path = export_onnx(args.model, args.out, args.opset)
    _say(f"ONNX model written to {path}; its pre- and post-processing are described in {sidecar_path(path)}")
    return 0


def cmd_evaluate(args) -> int:
    from medanomaly.core.runtime import resolve_device
    from medanomaly.evaluate.score import evaluate_model, evaluate_predictions

    split = None if args.split == "all" else args.split
    if args.model is not None:
        summary = evaluate_model(args.model, args.data, args.out, split=args.split and split or ("test" if args.split is None else None),
                                 splits_file=args.splits, device=str(resolve_device(args.device)), progress=not args.quiet)
    else:
        summary = evaluate_predictions(args.pred, args.data, args.out, split=split, splits_file=args.splits,
                                       progress=not args.quiet)
    keys = ["n_cases", "dice_per_case_mean", "dice", "iou", "sensitivity", "precision", "auroc", "auprc", "lesion_f1"]
    _say(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    _say(f"report: {args.out / 'report.html'}")
    return 0


def cmd_demo(args) -> int:
    from medanomaly.apps.demo import run_demo
    from medanomaly.core.runtime import resolve_device

    summary = run_demo(args.out, data=args.data, max_minutes=args.max_minutes, seed=args.seed,
                       device=str(resolve_device(args.device)), progress=not args.quiet)
    _say(f"demo finished: mean per-case Dice {summary['dice_per_case_mean']:.3f}; report: {args.out / 'eval' / 'report.html'}")
    return 0


def cmd_synthesize(args) -> int:
    from medanomaly.core.runtime import resolve_device
    from medanomaly.train.gan import GanConfig, synthesize

    given = {"size": args.size, "minutes": args.max_minutes, "max_steps": args.max_steps,
             "batch_size": args.batch_size, "width": args.width, "seed": args.seed}
    cfg = GanConfig(**{k: v for k, v in given.items() if v is not None})
    out = synthesize(args.data, args.out, args.n, cfg, args.splits, device=str(resolve_device(args.device)),
                     progress=not args.quiet, overwrite=args.overwrite)
    _say(f"{args.n} synthetic pairs written to {out} (manifest: {out / 'manifest.json'}); use them with "
         f"'medanomaly train DATA --extra {out} --size {cfg.size}'")
    return 0


def cmd_serve(args) -> int:
    from medanomaly.core.runtime import resolve_device

    try:
        from medanomaly.apps.serve import run
    except ImportError as exc:
        raise MedanomalyError(f"the web viewer needs fastapi, uvicorn and python-multipart ({exc}); install them with "
                              "'pip install -r requirements.lock' or 'pip install fastapi uvicorn python-multipart'") from exc
    run(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
        device=str(resolve_device(args.device)), quiet=args.quiet, say=_say)
    return 0


def _torchrun() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them, (0, 1) outside torchrun (read without importing torch)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)
    except ValueError:
        return 0, 1


def _say(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world = _torchrun()
    args.quiet = args.quiet or rank != 0  # under torchrun the other processes log warnings only, no progress bars
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format=f"{f'[rank {rank}] ' if rank else ''}%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    commands = {"train": cmd_train, "pretrain": cmd_pretrain, "predict": cmd_predict, "evaluate": cmd_evaluate, "demo": cmd_demo,
                "export": cmd_export, "serve": cmd_serve, "synthesize": cmd_synthesize,
                "plan": cmd_plan}
    try:
        if world > 1 and args.command not in ("train", "predict"):
            raise MedanomalyError(f"'{args.command}' runs in one process: under torchrun only 'train' and 'predict' "
                                  "are data parallel; run it without torchrun")
        return commands[args.command](args)
    except MedanomalyError as exc:
        _say("error: " + textwrap.fill(str(exc), width=100, subsequent_indent="  ",
                                               break_long_words=False, break_on_hyphens=False), err=True)
        return 2
    except PermissionError as exc:
        _say(f"error: permission denied: {exc.filename}; check the file's permissions or choose another path", err=True)
        return 2
    except KeyboardInterrupt:
        _say("interrupted; 'medanomaly train --resume' continues a training run from its last epoch", err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
