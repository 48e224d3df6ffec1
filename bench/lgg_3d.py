"""LGG as volumes: a 3D U-Net (each patient's FLAIR slices stacked in slice order) against the 2D
default, with the same training-time budget, both through the library's ``train`` (with the plan
``medanomaly train`` makes) and ``evaluate_model``: mean per-patient Dice on the `test` patients,
post-processing chosen on `val`.

    python bench/lgg_3d.py [--minutes 20] [--out runs/lgg-3d] [--splits FILE] [--patch 32 128 128]
                           [--spacing 1 2 2] [--only 2d|3d]

The stacked slices have no spacing: ``--spacing 1 2 2`` is in voxels of the stored 256 x 256
grid, i.e. 128 x 128 in-plane as the 2D default's input size. Prints a markdown table and writes
OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from medanomaly.apps.api import train_with_config as train
from medanomaly.config import schema as config
from medanomaly.evaluate.score import evaluate_model
from medanomaly.train import plan as planning

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"


def run(name: str, flags: dict, args) -> dict:
    """Plan as `medanomaly train` does (flags win), train into OUT/name, evaluate on test."""
    _, overrides = planning.for_run(args.data, args.splits, None, None, flags, "cpu")
    cfg = config.load(None, overrides)
    out = args.out / name
    t0 = time.perf_counter()
    res = train(args.data, out / "model", cfg, args.splits, device="cpu", progress=False)
    t_train = time.perf_counter() - t0
    s = evaluate_model(out / "model", args.data, out / "eval", split="test", progress=False)
    return {"model": name, "dim": cfg.model.dim, "per_patient_dice": s["dice_per_case_mean"],
            "per_patient_dice_std": s["dice_per_case_std"], "pixel_dice": s["dice"], "auprc": s["auprc"],
            "lesion_f1": s["lesion_f1"], "epochs": res.epochs_run, "best_epoch": res.best_epoch,
            "train_loop_min": res.seconds / 60, "train_cmd_min": t_train / 60,
            "eval_min": (time.perf_counter() - t0 - t_train) / 60,
            "input": (f"patch {'x'.join(map(str, cfg.patch))} at spacing {cfg.spacing}" if cfg.model.dim == 3
                      else f"{cfg.size}x{cfg.size} slices"),
            "width": cfg.model.width, "norm": cfg.model.norm, "test_cases": s["n_cases"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path("runs/lgg-3d"))
    p.add_argument("--splits", type=Path, help="split file (default: DATA/splits.json)")
    p.add_argument("--minutes", type=float, default=20.0, help="training budget of each model (default 20)")
    p.add_argument("--patch", type=int, nargs=3, default=(32, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 2.0, 2.0), metavar=("Z", "Y", "X"))
    p.add_argument("--only", choices=("2d", "3d"), help="run one of the two")
    p.add_argument("--set3d", nargs="*", default=[], help="3D overrides key=value (JSON values), e.g. model.width=8")
    args = p.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (the LGG data lives in ../shared/data)")
        return 0
    args.splits = args.splits or args.data / "splits.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    flags3d = {"max_minutes": args.minutes, "model.dim": 3, "patch": tuple(args.patch), "spacing": tuple(args.spacing),
               **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set3d)}}
    rows = []
    if args.only != "3d":
        rows.append(run("2d-default", {"max_minutes": args.minutes}, args))
    if args.only != "2d":
        rows.append(run("3d", flags3d, args))
    keys = ["model", "input", "per_patient_dice", "per_patient_dice_std", "pixel_dice", "auprc", "lesion_f1",
            "epochs", "train_loop_min", "eval_min", "test_cases"]
    print(f"\nLGG test patients, {args.minutes:g} min training budget each, CPU\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps({"minutes": args.minutes, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
