"""Data-parallel training on this machine: 1 process vs 2 torchrun processes, same global batch.

Trains the default model (``medanomaly train --no-plan``: the built-in defaults, batch norm) on
../shared/data/lgg-flair for ``--minutes`` each in three set-ups:

* 1 process, 1 torch thread;
* ``torchrun --standalone --nproc_per_node 2``, 1 torch thread per process;
* 1 process, 2 torch threads (what a plain ``medanomaly train`` uses on a 2-core machine).

    python bench/ddp.py [--minutes 10] [--splits FILE] [--batch-size 16] [--out runs/ddp] [-- extra train flags]

Prints a markdown table: processes, threads, training samples/s (median over epochs of
metrics.csv ``images_per_s``: global images per second of an epoch, validation included), best
validation Dice (mean per case at 0.5, the kept epoch), validation Dice after calibration,
epochs. Numbers vary with the machine and with whatever else runs on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"
SETUPS = ((1, 1), (2, 1), (1, 2))  # (processes, torch threads per process)


def run(processes: int, threads: int, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train one set-up into OUT/pP-tT; return its row of the table."""
    out = args.out / f"p{processes}-t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m", "medanomaly"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "medanomaly"]
    cmd = [*launcher, "-q", "train", str(args.data), "--out", str(out), "--no-plan", "--max-minutes",
           str(args.minutes), "--batch-size", str(args.batch_size), "--device", "cpu",
           *(["--splits", str(args.splits)] if args.splits else []), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    meta = json.loads((out / "model.json").read_text())
    return {"processes": processes, "threads": threads,
            "samples_per_s": statistics.median(float(r["images_per_s"]) for r in rows),
            "best_val_dice": max(float(r["val_dice"]) for r in rows),
            "calibrated_val_dice": meta["calibration"].get("mean_case_dice", float("nan")),
            "epochs": len(rows), "wall_min": wall / 60}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of each set-up (default 10)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--splits", type=Path, help="split file (default: DATA/splits.json)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch of every set-up (default 16)")
    p.add_argument("--out", type=Path, default=Path("runs/ddp"))
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (the LGG data lives in ../shared/data)")
        return 0
    rows = []
    for processes, threads in SETUPS:
        print(f"training: {processes} process(es) x {threads} thread(s), {args.minutes:g} min ...", file=sys.stderr,
              flush=True)
        rows.append(run(processes, threads, args, extra))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    (args.out / "result.json").write_text(json.dumps({"minutes": args.minutes, "batch_size": args.batch_size,
                                                      "extra": extra, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
