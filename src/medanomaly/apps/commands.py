"""What each ``medanomaly`` command does with its parsed arguments: a thin layer over the Python
API (:mod:`medanomaly.apps.api`; train, plan, predict, evaluate and calibrate are its functions, so
the CLI and the API cannot disagree) and the stage packages, that turns flags into their calls and
their results into the lines the command prints. :data:`COMMANDS` maps a command name to its
function; each returns the exit code (user errors are raised as MedanomalyError for the caller)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from medanomaly.apps import api
from medanomaly.apps.console import say
from medanomaly.apps.demo import run_demo
from medanomaly.apps.parser import TRAIN_KEYS
from medanomaly.config import schema as config
from medanomaly.config.sections import GanConfig
from medanomaly.core import distributed, jsonio
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import check_new_file
from medanomaly.core.runtime import resolve_device
from medanomaly.infer.export import export_onnx, sidecar_path
from medanomaly.train import plan as planning
from medanomaly.train.gan import synthesize

#: what ``evaluate`` prints of its summary.json
SUMMARY_KEYS = ("n_cases", "dice_per_case_mean", "dice", "iou", "sensitivity", "precision", "auroc", "auprc",
                "lesion_f1")


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train`` flags as overrides for :func:`medanomaly.config.schema.load`, keyed as
    :data:`TRAIN_KEYS` says; None where a flag is not given (the value then comes from elsewhere)."""
    given = {key: getattr(args, dest) for dest, key in TRAIN_KEYS.items()}
    for key, as_type in (("init", str), ("unlabelled", str), ("extra", str), ("patch", tuple), ("spacing", tuple)):
        given[key] = as_type(given[key]) if given[key] else None  # JSON-friendly in config.json
    return given


def cmd_train(args: argparse.Namespace) -> int:
    given = {k: v for k, v in train_overrides(args).items() if v is not None}
    model = api.train(args.data, args.out, device=args.device, splits=args.splits, config=args.config,
                      plan=False if args.no_plan else args.plan or True, resume=args.resume, progress=not args.quiet,
                      **given)
    if not distributed.is_main():
        return 0
    t, times = model.training, model.timings
    say(f"model written to {model.path} (best epoch {t.best_epoch}, val score {t.best_val_score:.4f}, "
        f"{times['training_s'] / 60:.1f} min training, {times['calibration_s']:.0f} s calibration)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    target = args.out / "plan.json" if args.out.is_dir() else args.out
    check_new_file(target, args.overwrite)  # before the data is read
    plan = api.plan(args.data, max_minutes=args.max_minutes, task=args.task, device=args.device, splits=args.splits)
    out = planning.save_plan(plan, target, args.overwrite)
    say(plan.table())
    say(f"plan written to {out}; use it with 'medanomaly train {args.data} --plan {out} --out MODEL_DIR'")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = config.load(None, {"task": "anomaly", "anomaly.method": "denoise", "anomaly.normal_only": False,
                             "size": args.size, "epochs": args.epochs, "max_minutes": args.max_minutes,
                             "batch_size": args.batch_size, "model.width": args.width, "model.depth": args.depth,
                             "model.encoder": args.encoder, "seed": args.seed})
    res = api.train_with_config(args.data, args.out, cfg, args.splits, device=str(resolve_device(args.device)),
                                progress=not args.quiet)
    say(f"pretrained model written to {res.out_dir} ({res.seconds / 60:.1f} min); use it with "
        f"'medanomaly train DATA --init {res.out_dir}'")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    res = api.predict(args.model, args.inputs, args.out, device=args.device, overwrite=args.overwrite,
                      progress=not args.quiet, runtime=args.runtime, dicom_seg=args.dicom_seg, naming=args.naming)
    if not distributed.is_main():  # rank 0 reports (and its exit code says whether a file failed)
        return 0
    say(f"{res['n_ok']} images predicted into {res['out']}")
    for f in res["failed"]:
        say(f"failed: {f['input']}: {f['error']}", err=True)
    return 1 if res["failed"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    path = export_onnx(args.model, args.out, args.opset, overwrite=args.overwrite)
    say(f"ONNX model written to {path}; its pre- and post-processing are described in {sidecar_path(path)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    post = api.calibrate(args.model, args.data, device=args.device, overwrite=args.overwrite,
                         progress=not args.quiet)
    say(f"{args.model / 'model.json'} written: threshold {post.threshold:.4g}, minimum region {post.min_size} "
        "pixels, chosen on the val split")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    given = args.model if args.model is not None else args.pred
    summary = api.evaluate(given, args.data, args.out, split=args.split, splits=args.splits, device=args.device,
                           progress=not args.quiet, overwrite=args.overwrite, predictions=args.model is None,
                           labels=args.labels)
    say(jsonio.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=1))
    for name, entry in summary.get("labels", {}).items():  # several labels: each label's own Dice
        say(f"label {entry['value']} {name}: Dice {entry['dice']:.3f}, per case {entry['dice_per_case_mean']:.3f}")
    say(f"report: {args.out / 'report.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, data=args.data, max_minutes=args.max_minutes, seed=args.seed,
                       device=str(resolve_device(args.device)), progress=not args.quiet, overwrite=args.overwrite)
    say(f"demo finished: mean per-case Dice {summary['dice_per_case_mean']:.3f}; "
        f"report: {args.out / 'eval' / 'report.html'}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    given = {"size": args.size, "minutes": args.max_minutes, "max_steps": args.max_steps,
             "batch_size": args.batch_size, "width": args.width, "seed": args.seed}
    cfg = GanConfig(**{k: v for k, v in given.items() if v is not None})
    out = synthesize(args.data, args.out, args.n, cfg, args.splits, device=str(resolve_device(args.device)),
                     progress=not args.quiet, overwrite=args.overwrite)
    say(f"{args.n} synthetic pairs written to {out} (manifest: {out / 'manifest.json'}); use them with "
        f"'medanomaly train DATA --extra {out} --size {cfg.size}'")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # imported on use: fastapi costs 0.8 s to import, which the other commands need not pay
        from medanomaly.apps.serve import run
    except ImportError as exc:
        raise MedanomalyError(f"the web viewer needs fastapi, uvicorn and python-multipart ({exc}); install them "
                              "with 'pip install -r requirements.lock' or 'pip install fastapi uvicorn "
                              "python-multipart'") from exc
    run(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
        device=str(resolve_device(args.device)), quiet=args.quiet, say=say, max_memory_mb=args.max_memory_mb)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "pretrain": cmd_pretrain, "predict": cmd_predict, "evaluate": cmd_evaluate, "demo": cmd_demo,
    "export": cmd_export, "serve": cmd_serve, "synthesize": cmd_synthesize, "plan": cmd_plan,
    "calibrate": cmd_calibrate,
}
