"""Supervised LGG benchmark: `medanomaly train DATA --max-minutes M` exactly (the plan measures this
machine and chooses size, batch, network and epochs) on the `train` patients of
../shared/data/lgg-flair, post-processing chosen on `val`, reported on `test`.

    python bench/lgg_supervised.py [--out runs/lgg-sup] [--max-minutes 30] [--threads N] [--set key=value...]

`--threads 1` vs the default (all cores) at the same budget is the slow-machine check of the plan:
each run's table row (and result.json) states what the plan chose (size, epochs, the images it
expects and its minimum) and what the run did (epochs, images seen, per-patient test Dice).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/lgg-supervised"))
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--max-minutes", type=float, default=30.0, help="training budget, as `train --max-minutes`")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and OpenMP; default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", type=Path, help="TrainConfig JSON: beats the plan, as `train --config`")
    p.add_argument("--set", nargs="*", default=[], help="settings key=value (JSON values), e.g. model.width=16: "
                   "beat the plan, as train's flags")
    p.add_argument("--no-plan", action="store_true", help="the config defaults instead of the plan")
    p.add_argument("--resume", action="store_true")
    return p.parse_args()


def _options(sets: list[str]) -> dict:
    """key=value settings as api.train takes them: dotted keys (model.width) become nested dicts."""
    out: dict = {}
    for key, value in (s.split("=", 1) for s in sets):
        section, _, name = key.rpartition(".")
        (out.setdefault(section, {}) if section else out)[name] = json.loads(value)
    return out


def main() -> int:
    args = _args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (the LGG data lives in ../shared/data)")
        return 0
    if args.threads:  # before torch starts its thread pools
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    from medanomaly.apps import api
    from medanomaly.evaluate.score import evaluate_model
    from medanomaly.train.plan import load_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0, model_dir = time.perf_counter(), args.out / "model"
    model = api.train(args.data, model_dir, max_minutes=args.max_minutes, device=args.device, config=args.config,
                      plan=not args.no_plan, resume=args.resume, progress=False, **_options(args.set))
    t_train = time.perf_counter() - t0
    s = evaluate_model(model_dir, args.data, args.out / "eval", split="test", device=args.device, progress=False,
                       overwrite=True)
    meta = json.loads((model_dir / "model.json").read_text())
    plan = load_plan(model_dir / "plan.json") if (model_dir / "plan.json").is_file() else None
    tr = meta["training"]
    row = {"threads": torch.get_num_threads(), "max_min": args.max_minutes,
           "plan_size": plan.size if plan else None, "plan_epochs": plan.epochs if plan else None,
           "plan_img_s": plan.images_per_s if plan else None, "plan_images": plan.images_expected if plan else None,
           "min_images": plan.min_images if plan else None, "images_seen": tr.get("images_seen"),
           "epochs": tr.get("epochs"), "best_epoch": tr["best_epoch"], "per_patient_dice": s["dice_per_case_mean"],
           "pixel_dice": s["dice"], "auprc": s["auprc"], "lesion_f1": s["lesion_f1"],
           "train_loop_min": tr.get("train_minutes"), "train_cmd_min": t_train / 60,
           "total_min": (time.perf_counter() - t0) / 60, "threshold": s["postprocess"]["threshold"]}
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    (args.out / "result.json").write_text(json.dumps({"config": meta["config"], "timings": model.timings,
                                                      "result": row}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
