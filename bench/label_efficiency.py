"""Learning from few labels on LGG FLAIR: which remedy helps, and by how much.

Trains on 3, 10 and 60 labelled `train` patients of ../shared/data/lgg-flair (the other `train`
patients are the unlabelled images), selects on `val`, reports the mean per-patient Dice on `test`,
for each remedy of `medanomaly train`:

    plain        no remedy
    init         --init from `medanomaly pretrain` (coarse-noise denoising on every train image, masks ignored)
    unlabelled   --unlabelled --unlabelled-method mean-teacher (the unlabelled patients; none left at 60)
    synthetic    --synthetic-lesions 0.5
    gan          --extra: pairs written by `medanomaly synthesize` (GAN trained on the labelled patients only)
    combo        the remedies whose mean *validation* Dice gain over plain was positive at that size
                 (at least the best two), chosen on val, never on test

Every run gets the same training-time budget (--minutes, on --threads threads per run; two runs
share the machine's cores). The labelled patients of a seed are the same for every remedy (paired
comparison); each configuration runs with 2 seeds and the spread is shown.

    python bench/label_efficiency.py [--out runs/label-efficiency] [--minutes 2.5] [--sizes 3 10 60]
                                     [--seeds 0 1] [--workers 2] [--pretrain-minutes 8] [--gan-minutes 3]

Writes OUT/results.csv (one row per run), OUT/summary.csv, OUT/label_efficiency.png and prints a
markdown table. Finished runs are reused, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"
SINGLES = ("plain", "init", "unlabelled", "synthetic", "gan")
log = logging.getLogger("label_efficiency")


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def overrides_for(remedies: tuple[str, ...], job: dict) -> dict:
    """TrainConfig overrides of a set of remedies."""
    o: dict = {}
    if "init" in remedies:
        o["init"] = job["pretrain"]
    if "unlabelled" in remedies:  # the list of that name in the run's split file; the mean teacher
        o["unlabelled"], o["unlabelled_method"] = "unlabelled", "mean-teacher"
    if "synthetic" in remedies:
        o["synthetic_lesions"] = 0.5
    if "gan" in remedies:
        o["extra"] = job["gan"]
    return o


def run_job(job: dict) -> dict:
    """One training run (or the pretraining / a GAN), reused when its result.json exists."""
    out = Path(job["out"])
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    if job["kind"] == "pretrain":
        result = _pretrain(job)
    elif job["kind"] == "gan":
        result = _gan(job)
    else:
        result = _train_and_test(job)
    result["wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(result, indent=1))
    return result


def _pretrain(job: dict) -> dict:
    from medanomaly.apps.api import train_with_config as train
    from medanomaly.config import schema as config

    cfg = config.load(None, {"task": "anomaly", "anomaly.method": "denoise", "anomaly.normal_only": False,
                             "max_minutes": job["minutes"], "seed": 0})
    res = train(job["data"], Path(job["out"]) / "model", cfg, job["splits"], progress=False)
    return {"kind": "pretrain", "train_s": res.seconds, "epochs": res.epochs_run}


def _gan(job: dict) -> dict:
    from medanomaly.train.gan import GanConfig, synthesize

    cfg = GanConfig(minutes=job["minutes"], seed=job["seed"])
    synthesize(job["data"], Path(job["out"]) / "pairs", job["n_pairs"], cfg, splits_file=job["splits"], progress=False)
    return {"kind": "gan"}


def _train_and_test(job: dict) -> dict:
    from medanomaly.apps.api import train_with_config as train
    from medanomaly.config import schema as config
    from medanomaly.evaluate.score import evaluate_model

    cfg = config.load(None, {"max_minutes": job["minutes"], "seed": job["seed"], **overrides_for(tuple(job["remedies"]), job)})
    out = Path(job["out"])
    res = train(job["data"], out / "model", cfg, job["splits"], progress=False)
    meta = json.loads((out / "model" / "model.json").read_text())
    s = evaluate_model(out / "model", job["data"], out / "eval", split="test", progress=False)
    return {"kind": "train", "n": job["n"], "seed": job["seed"], "remedy": job["name"], "remedies": job["remedies"],
            "test_dice": s["dice_per_case_mean"], "val_dice": meta["calibration"]["mean_case_dice"],
            "train_s": res.seconds, "epochs": res.epochs_run, "best_epoch": res.best_epoch}


def write_splits(base: dict, n: int, seed: int, folder: Path) -> Path:
    """The split file of n labelled patients for a seed: the rest of `train` is `unlabelled`."""
    train = sorted(base["train"])
    labelled = sorted(random.Random(1000 * seed + n).sample(train, n))
    path = folder / f"n{n}-s{seed}.json"
    path.write_text(json.dumps({"train": labelled, "val": base["val"], "test": base["test"],
                                "unlabelled": [c for c in train if c not in labelled]}, indent=1))
    return path


def choose_combo(rows: list[dict], n: int) -> tuple[str, ...]:
    """Remedies with a positive mean val-Dice gain over plain at size n (at least the best two)."""
    def val(remedy: str) -> float:
        vals = [r["val_dice"] for r in rows if r["n"] == n and r["remedy"] == remedy]
        return sum(vals) / len(vals)

    ran = {r["remedy"] for r in rows if r["n"] == n}
    gains = sorted(((val(r) - val("plain"), r) for r in SINGLES if r != "plain" and r in ran), reverse=True)
    chosen = [r for g, r in gains if g > 0]
    if len(chosen) < 2:
        chosen = [r for _, r in gains[:2]]
    return tuple(sorted(chosen))


def summarize(rows: list[dict], sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        plain = _mean([r["test_dice"] for r in rows if r["n"] == n and r["remedy"] == "plain"])
        for remedy in (*SINGLES, "combo"):
            rs = [r for r in rows if r["n"] == n and r["remedy"] == remedy]
            if not rs:
                continue
            dices = [r["test_dice"] for r in rs]
            out.append({"n": n, "remedy": remedy, "remedies": "+".join(rs[0]["remedies"]) or "-",
                        "test_dice_mean": _mean(dices), "test_dice_min": min(dices), "test_dice_max": max(dices),
                        "delta_vs_plain": _mean(dices) - plain, "val_dice_mean": _mean([r["val_dice"] for r in rs]),
                        "train_min_mean": _mean([r["train_s"] for r in rs]) / 60, "seeds": len(rs)})
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def plot(summary: list[dict], path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for remedy in (*SINGLES, "combo"):
        rs = sorted((s for s in summary if s["remedy"] == remedy), key=lambda s: s["n"])
        if not rs:
            continue
        x = [s["n"] for s in rs]
        y = [s["test_dice_mean"] for s in rs]
        err = [[s["test_dice_mean"] - s["test_dice_min"] for s in rs], [s["test_dice_max"] - s["test_dice_mean"] for s in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=remedy if remedy != "combo" else
                    "combo (" + ", ".join(sorted({s["remedies"] for s in rs})) + ")")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([s for s in sorted({s["n"] for s in summary})], [str(s) for s in sorted({s["n"] for s in summary})])
    ax.set_xlabel("labelled training patients")
    ax.set_ylabel("mean per-patient Dice (test)")
    ax.set_title(f"LGG FLAIR, few labels: {minutes:g} min training per run; bars: min..max of the seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path("runs/label-efficiency"))
    p.add_argument("--minutes", type=float, default=2.5, help="training budget of every run")
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 60])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--pretrain-minutes", type=float, default=8.0)
    p.add_argument("--gan-minutes", type=float, default=3.0)
    p.add_argument("--gan-pairs", type=int, default=200)
    args = p.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (the LGG data lives in ../shared/data)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t_start = time.perf_counter()
    out = args.out.resolve()
    (out / "splits").mkdir(parents=True, exist_ok=True)
    base = json.loads((args.data / "splits.json").read_text())
    pre_splits = out / "splits" / "pretrain.json"
    pre_splits.write_text(json.dumps({"train": base["train"], "val": base["val"], "test": base["test"]}))
    common = {"data": str(args.data.resolve()), "minutes": args.minutes, "pretrain": str(out / "pretrain" / "model")}
    subsets = {(n, s): write_splits(base, n, s, out / "splits") for n in args.sizes for s in args.seeds}
    prep = [{**common, "kind": "pretrain", "out": str(out / "pretrain"), "splits": str(pre_splits),
             "minutes": args.pretrain_minutes}]
    prep += [{**common, "kind": "gan", "out": str(out / "gan" / f"n{n}-s{s}"), "splits": str(f), "seed": s,
              "minutes": args.gan_minutes, "n_pairs": args.gan_pairs} for (n, s), f in subsets.items()]

    def job(n: int, s: int, name: str, remedies: tuple[str, ...]) -> dict:
        return {**common, "kind": "train", "n": n, "seed": s, "name": name, "remedies": list(remedies),
                "splits": str(subsets[(n, s)]), "gan": str(out / "gan" / f"n{n}-s{s}" / "pairs"),
                "out": str(out / "runs" / f"n{n}-s{s}-{name}")}

    ctx = get_context("spawn")  # fresh interpreters: no threads inherited from this one
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init, initargs=(args.threads,)) as pool:
        list(pool.map(run_job, prep))
        log.info("pretraining and GANs done (%.1f min)", (time.perf_counter() - t_start) / 60)
        singles = [job(n, s, r, () if r == "plain" else (r,)) for n in args.sizes for s in args.seeds for r in SINGLES
                   if r != "unlabelled" or n < len(base["train"])]  # with every patient labelled none is left
        rows = [r for r in pool.map(run_job, singles)]
        log.info("single remedies done (%.1f min)", (time.perf_counter() - t_start) / 60)
        combos = {n: choose_combo(rows, n) for n in args.sizes}
        rows += list(pool.map(run_job, [job(n, s, "combo", combos[n]) for n in args.sizes for s in args.seeds]))
    wall = (time.perf_counter() - t_start) / 60
    fields = ["n", "seed", "remedy", "remedies", "test_dice", "val_dice", "train_s", "epochs", "best_epoch", "wall_s"]
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "remedies": "+".join(r["remedies"]) or "-"} for r in rows)
    summary = summarize(rows, args.sizes)
    with (out / "summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    plot(summary, out / "label_efficiency.png", args.minutes)
    print(f"label efficiency on LGG FLAIR test (mean per-patient Dice; {args.minutes:g} min training per run, "
          f"{args.threads} thread(s), {args.workers} runs in parallel; seeds {args.seeds}); bench wall time {wall:.1f} min")
    print("| labelled patients | remedy | test Dice mean | min..max | vs plain | val Dice | train min |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        name = s["remedy"] if s["remedy"] != "combo" else f"combo ({s['remedies']})"
        print(f"| {s['n']} | {name} | {s['test_dice_mean']:.3f} | {s['test_dice_min']:.3f}..{s['test_dice_max']:.3f} "
              f"| {s['delta_vs_plain']:+.3f} | {s['val_dice_mean']:.3f} | {s['train_min_mean']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
