"""medanomaly's sliding-window inference against MONAI's ``sliding_window_inference``
(``mode="gaussian"``, the same patch, overlap and batch), on the same network and volume:
wall time of each (best of --repeats) and the largest difference of their outputs.

    python bench/sliding_window.py [--volume 48 160 160] [--patch 16 128 128] [--overlap 0.5] [--width 16]

Needs MONAI (``pip install -e .[bench]``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from medanomaly.core.runtime import autocast, cpu_has_bf16
from medanomaly.infer.sliding import sliding_window
from medanomaly.models.unet import UNet, UNetConfig


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out, best = fn(), float("inf")  # the first call warms up
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volume", type=int, nargs=3, default=(48, 160, 160), metavar=("Z", "Y", "X"))
    p.add_argument("--patch", type=int, nargs=3, default=(16, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        print("skipped: MONAI is not installed (pip install -e .[bench])")
        return 0
    torch.manual_seed(0)
    precision = "bf16" if cpu_has_bf16() else "fp32"
    model = UNet(UNetConfig(dim=3, width=args.width, depth=4, norm="instance")).eval()
    vol = torch.rand(1, *args.volume)
    dev = torch.device("cpu")

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(dev, precision):
            return model(x).float()

    with torch.inference_mode():
        t_ours, ours = best_time(lambda: sliding_window(vol, args.patch, forward, args.overlap, args.batch),
                                 args.repeats)
        t_monai, theirs = best_time(lambda: sliding_window_inference(
            vol[None], args.patch, args.batch, forward, overlap=args.overlap, mode="gaussian")[0], args.repeats)
    diff = float((ours - theirs).abs().max())
    print(f"volume {'x'.join(map(str, args.volume))}, patch {'x'.join(map(str, args.patch))}, overlap "
          f"{args.overlap}, batch {args.batch}, 3D U-Net w{args.width} {precision}, {torch.get_num_threads()} threads")
    print("| implementation | seconds (best of %d) | max abs difference |" % args.repeats)
    print("|---|---|---|")
    print(f"| medanomaly.infer.sliding.sliding_window | {t_ours:.3f} | - |")
    print(f"| monai.inferers.sliding_window_inference (gaussian) | {t_monai:.3f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
