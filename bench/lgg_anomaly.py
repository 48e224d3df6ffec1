"""Unsupervised anomaly detection on LGG FLAIR: train on the tumour-free slices of the `train`
patients of ../shared/data/lgg-flair, calibrate on `val`, report on `test`, for
(i) the coarse-noise denoising U-Net (the default of `medanomaly train --task anomaly`),
(ii) the same U-Net trained without noise (the identity ablation), (iii) the intensity baseline,
(iv) the self-supervised synthetic-anomaly segmenter (method 'synthetic', as FPI/DRAEM).

    python bench/lgg_anomaly.py [--out runs/lgg-anomaly] [--minutes 25] [--ablation-minutes 10]
                                [--synthetic-minutes 20] [--recalibrate]

Models already trained in --out are reused (evaluated again, or recalibrated with --recalibrate).

Prints one markdown table; every row measured in this run on the same test cases.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

from medanomaly.apps.api import train_with_config as train
from medanomaly.calibrate.search import recalibrate
from medanomaly.config import schema as config
from medanomaly.evaluate.score import evaluate_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"
COLUMNS = ("auprc", "dice", "oracle_dice", "image_auroc", "lesion_f1", "auroc", "dice_per_case_mean")


def run(method: str, minutes: float, args) -> dict:
    out = args.out / method
    cfg = config.load(None, {"task": "anomaly", "anomaly.method": method, "max_minutes": minutes, "seed": args.seed})
    t0 = time.perf_counter()
    if not (out / "model" / "model.json").exists():
        train(args.data, out / "model", cfg, progress=False)
    elif args.recalibrate:  # reuse the trained network, choose map settings and thresholds on val again
        recalibrate(out / "model", args.data, progress=False)
    t_train = time.perf_counter() - t0
    metrics = out / "model" / "metrics.csv"  # the training loop's own seconds, also when recalibrating
    train_min = sum(float(r["seconds"]) for r in csv.DictReader(metrics.open())) / 60 if metrics.exists() else 0.0
    s = evaluate_model(out / "model", args.data, out / "eval", split="test", progress=False)
    return {"method": method, **{k: s.get(k) for k in COLUMNS}, "train_min": train_min,
            "threshold_mode": s["calibration"].get("mode"), "setup_min": t_train / 60,
            "map": "{residual}/erode {erode}/median {median_size}".format(
                **json.loads((out / "model" / "model.json").read_text())["anomaly"]),
            "baseline": s.get("baseline")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/lgg-anomaly"))
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--minutes", type=float, default=25.0, help="training budget of the denoising U-Net")
    p.add_argument("--ablation-minutes", type=float, default=10.0, help="training budget of the no-noise ablation")
    p.add_argument("--synthetic-minutes", type=float, default=20.0,
                   help="training budget of the synthetic-anomaly segmenter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recalibrate", action="store_true",
                   help="reuse models already trained in --out; choose map settings and thresholds on val again")
    args = p.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (the LGG data lives in ../shared/data)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = [run("denoise", args.minutes, args), run("identity", args.ablation_minutes, args),
            run("intensity", 0, args), run("synthetic", args.synthetic_minutes, args)]
    header = ("method",) + COLUMNS + ("train_min", "threshold_mode", "map")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in header) + " |")
    (args.out / "result.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
