"""Bounded memory of ``medanomaly predict``: peak resident memory and wall time for N = 200 and
N = 2000 real LGG FLAIR slices (symlinked from ../shared/data/lgg-flair into a temporary folder, no
masks), each N predicted by a fresh ``medanomaly predict MODEL FOLDER --out OUT --no-dicom-seg``
child process.

    python bench/predict_memory.py [--model runs/lgg-default/model] [--n 200 2000] [--device cpu]

Without ``--model`` a small model (64x64, width 8, one epoch on a few slices) is trained first with
``medanomaly train``. The peak RSS is the child's own ``ru_maxrss`` (``os.wait4`` on its pid, which
is what ``getrusage(RUSAGE_CHILDREN)`` reports for a single child; the cumulative RUSAGE_CHILDREN
value would carry the larger run's peak into the next row). ``RSS at 10 %`` and ``RSS at 90 %`` are
/proc samples of the child taken when a tenth and nine tenths of the outputs were written: flat
between them means memory does not grow with the number of images. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LGG = ROOT.parent / "shared" / "data" / "lgg-flair"


def link_slices(n: int, dest: Path) -> int:
    """Symlink the first n FLAIR slices (sorted by patient, then name) into dest/<patient>/."""
    slices = sorted(LGG.glob("*/*_flair.png"))[:n]
    for s in slices:
        (dest / s.parent.name).mkdir(parents=True, exist_ok=True)
        (dest / s.parent.name / s.name).symlink_to(s)
    return len(slices)


def train_small_model(work: Path, device: str) -> Path:
    """A quick model directory from 3 train + 1 val patients (6 slices each), 64x64, width 8, 1 epoch."""
    data, model = work / "train-data", work / "model"
    splits = json.loads((LGG / "splits.json").read_text())
    cases = {"train": splits["train"][:3], "val": splits["val"][:1], "test": []}
    for patients in cases.values():
        for p in patients:
            masks = sorted((LGG / p).glob("*_mask.png"))
            mid = len(masks) // 2
            (data / p).mkdir(parents=True)
            for m in masks[mid - 3:mid + 3]:
                for f in (m, m.with_name(m.name.replace("_mask.png", "_flair.png"))):
                    (data / p / f.name).symlink_to(f)
    (data / "splits.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-m", "medanomaly", "-q", "train", str(data), "--out", str(model),
                    "--size", "64", "--width", "8", "--epochs", "1", "--batch-size", "4", "--device", device],
                   check=True, env=_env())
    return model


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_predict(model: Path, folder: Path, out: Path, n: int, device: str) -> dict:
    """One fresh child, reaped with os.wait4 so its own ru_maxrss is known; wall time; RSS samples
    (/proc) when 10 % and 90 % of the images are done."""
    cmd = [sys.executable, "-m", "medanomaly", "-q", "predict", str(model), str(folder), "--out", str(out),
           "--no-dicom-seg", "--device", device]
    t0 = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, _env(), file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    samples: dict[float, float | None] = {}
    next_look = t0
    while True:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            break
        if time.perf_counter() >= next_look:  # counting the outputs costs the parent CPU: once a second
            done = sum(1 for _ in out.rglob("*_overlay.png")) if out.exists() else 0  # the last output per image
            for frac in (0.1, 0.9):
                if frac not in samples and done >= frac * n:
                    samples[frac] = _rss_mib(pid)
            next_look = time.perf_counter() + 1.0
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    # ru_maxrss is in KiB on Linux
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": seconds, "peak_mib": usage.ru_maxrss / 1024,
            "samples": samples}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: train a small one first)")
    p.add_argument("--n", type=int, nargs="+", default=[200, 2000], help="numbers of slices (default 200 2000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", type=Path, help="keep the temporary folders here instead of deleting them")
    args = p.parse_args()
    if not LGG.is_dir():
        print(f"skipped: {LGG} not found (the LGG data lives in ../shared/data)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="predict-memory-", dir=args.keep))
    try:
        model = args.model or train_small_model(work, args.device)
        meta = json.loads((model / "model.json").read_text())
        print(f"model {model}: {meta['input']['size']}x{meta['input']['size']}, width {meta['model']['width']}, "
              f"depth {meta['model']['depth']}; device {args.device}; OMP_NUM_THREADS={_env()['OMP_NUM_THREADS']}")
        print()
        print("| N | peak RSS MiB | RSS at 10 % MiB | RSS at 90 % MiB | seconds | slices/min |")
        print("|---|---|---|---|---|---|")
        for n in args.n:
            folder, out = work / f"in-{n}", work / f"out-{n}"
            got = link_slices(n, folder)
            res = run_predict(model, folder, out, got, args.device)
            if res["rc"] != 0:
                print(f"predict exited with {res['rc']} for N={got}", file=sys.stderr)
                return 1
            s = res["samples"]
            fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
            print(f"| {got} | {res['peak_mib']:.0f} | {fmt(s.get(0.1))} | {fmt(s.get(0.9))} | {res['seconds']:.1f} "
                  f"| {got / res['seconds'] * 60:.0f} |", flush=True)
            shutil.rmtree(out)  # free the disk before the next N
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
