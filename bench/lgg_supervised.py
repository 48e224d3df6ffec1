"""Supervised LGG benchmark: `medanomaly train` defaults on the `train` patients of
../shared/data/lgg-flair, post-processing chosen on `val`, reported on `test`.

    python bench/lgg_supervised.py [--out runs/lgg-sup] [--max-minutes 25] [extra train flags...]

Prints one table row: per-patient Dice, pixel Dice, AUPRC, lesion F1, wall times.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from medanomaly.apps.api import train
from medanomaly.config import schema as config
from medanomaly.evaluate.score import evaluate_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/lgg-supervised"))
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--config", type=Path, help="TrainConfig JSON (default: the built-in defaults)")
    p.add_argument("--set", nargs="*", default=[], help="overrides key=value (JSON values), e.g. model.width=16")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (the LGG data lives in ../shared/data)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = config.load(args.config, overrides)
    t0 = time.perf_counter()
    res = train(args.data, args.out / "model", cfg, resume=args.resume, progress=False)
    t_train = time.perf_counter() - t0
    s = evaluate_model(args.out / "model", args.data, args.out / "eval", split="test", progress=False)
    t_total = time.perf_counter() - t0
    row = {"per_patient_dice": s["dice_per_case_mean"], "pixel_dice": s["dice"], "auprc": s["auprc"],
           "auroc": s["auroc"], "lesion_f1": s["lesion_f1"], "best_epoch": res.best_epoch,
           "epochs": res.epochs_run, "train_loop_min": res.seconds / 60, "train_cmd_min": t_train / 60,
           "total_min": t_total / 60, "threshold": s["postprocess"]["threshold"], "min_size": s["postprocess"]["min_size"]}
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    (args.out / "result.json").write_text(json.dumps({"config": cfg.to_dict(), "result": row}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
