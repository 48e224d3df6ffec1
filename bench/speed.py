"""Speed on this machine: training and inference images/s of medanomaly's U-Net and MONAI's
BasicUNet at the same base width and input size, measured in the same run; inference of the same
network exported to ONNX and run by ONNX Runtime; the default with ``torch.compile`` (Inductor);
achieved GFLOP/s against a large matmul and a bf16 convolution; where a training step's time goes
(convolutions vs the memory-bound rest, with the memory bandwidth of large elementwise ops); the
cost of augmentation.

    python bench/speed.py [--size 128] [--batch 16] [--width 32] [--steps 10] [--model runs/lgg-default/model]

With --model (a trained 2D model directory) it also measures predict on real LGG slices: the latency
of one 256x256 slice with the model loaded (read, normalise, resize, network, resize back,
post-process; median of 20), and streamed `predict_paths` throughput over --predict-n slices written
to a temporary folder (masks, score maps, overlays).

Prints a markdown table. Numbers vary with the machine and with whatever else runs on it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medanomaly.core.runtime import autocast, cpu_has_bf16
from medanomaly.data.augment import AugmentConfig, augment_batch
from medanomaly.models.unet import UNet, UNetConfig

DEV = torch.device("cpu")


def flops_of(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs (multiply-adds x 2) of one batch."""
    with FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def time_it(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def train_step_fn(model, x, y, precision):
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        with autocast(DEV, precision):
            out = model(x)
        loss = F.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def infer_fn(model, x, precision):
    def step():
        with torch.inference_mode(), autocast(DEV, precision):
            model(x)
    return step


def bench_model(name, model, args, precision, channels_last, compile_: bool = False) -> dict:
    x = torch.rand(args.batch, 1, args.size, args.size)
    y = (torch.rand_like(x) > 0.95).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fwd = flops_of(model, x)
    model.train()
    run = torch.compile(model) if compile_ else model  # compiled once per mode, in the warm-up steps
    t_train = time_it(train_step_fn(run, x, y, precision), args.steps, warmup=3 if compile_ else 2)
    model.eval()
    t_inf = time_it(infer_fn(run, x, precision), args.steps, warmup=3 if compile_ else 2)
    return {"model": name, "precision": precision, "channels_last": channels_last,
            "train_img_s": args.batch / t_train, "infer_img_s": args.batch / t_inf,
            "train_gflop_s": 3 * fwd / t_train / 1e9, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def peaks(args) -> dict:
    """Matmul and 3x3-convolution throughput; the conv peak is the best of a few U-Net-like shapes
    (channels-last, weights and activations already in the dtype, so no casts are timed)."""
    a = torch.randn(2048, 2048)
    t32 = time_it(lambda: a @ a, 5)
    ab = a.bfloat16()
    t16 = time_it(lambda: ab @ ab, 5)
    out = {"matmul_fp32": 2 * 2048**3 / t32 / 1e9, "matmul_bf16": 2 * 2048**3 / t16 / 1e9}
    for dtype, name in ((torch.float32, "conv_fp32"), (torch.bfloat16, "conv_bf16")):
        best = 0.0
        for ch, hw in ((64, args.size), (128, args.size // 2), (256, args.size // 4)):
            conv = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False).to(dtype).to(memory_format=torch.channels_last)
            x = torch.randn(args.batch, ch, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                t = time_it(lambda: conv(x), 5)
            best = max(best, 2 * ch * ch * 9 * args.batch * hw * hw / t / 1e9)
        out[name] = best
    return out


CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
            "aten::convolution", "aten::conv2d", "aten::conv_transpose2d")


def step_breakdown(args, precision: str) -> dict:
    """Self time per training step of the default U-Net (bf16, channels-last) from the profiler:
    convolutions (forward and backward) against everything else, and GFLOP/s within the convolutions."""
    from torch.profiler import ProfilerActivity, profile

    model = UNet(UNetConfig(width=args.width)).to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand_like(x) > 0.95).float()
    fwd = flops_of(model, x)
    step = train_step_fn(model.train(), x, y, precision)
    for _ in range(2):
        step()
    n = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / n / 1e6  # seconds per step
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS) / n / 1e6
    top = sorted((e for e in events if e.key not in CONV_OPS), key=lambda e: -e.self_cpu_time_total)[:4]
    return {"step_s": total, "conv_s": conv, "conv_gflop_s": 3 * fwd / conv / 1e9,
            "others": [(e.key.removeprefix("aten::"), e.self_cpu_time_total / n / 1e6) for e in top]}


def memory_bandwidth() -> dict:
    """GB/s (read + write) of a bf16 LeakyReLU over 4 MB (cache-resident) and 64 MB (main memory)."""
    out = {}
    for mb in (4, 64):
        x = torch.randn(mb * 2**20 // 2, dtype=torch.bfloat16)
        t = time_it(lambda: F.leaky_relu(x, 0.01), 10)
        out[f"{mb} MB"] = 2 * mb * 2**20 / t / 1e9
    return out


def onnx_infer_img_s(model: torch.nn.Module, args) -> float:
    """Inference images/s of the same network exported to ONNX (fp32) and run by ONNX Runtime."""
    import tempfile
    import warnings

    import onnxruntime as ort

    x = torch.rand(args.batch, 1, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = f"{tmp}/m.onnx"
        torch.onnx.export(model.eval(), (x,), path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}}, opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"image": x.numpy()}
        return args.batch / time_it(lambda: sess.run(None, feed), args.steps)


def augment_cost(args) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size)
    m = (torch.rand_like(x) > 0.9).float()
    cfg = AugmentConfig(p_affine=1.0, p_elastic=1.0, p_gamma=1.0, p_contrast=1.0, p_noise=1.0)
    return time_it(lambda: augment_batch(x, m, cfg, gen), args.steps)


def bench_3d(args, precision: str, patch=(32, 128, 128), batch: int = 2, width: int = 16) -> dict:
    """3D U-Net (instance norm, depth 4: what `train --dim 3` plans on a CPU) on batches of patches."""
    model = UNet(UNetConfig(dim=3, width=width, depth=4, norm="instance"))
    x = torch.rand(batch, 1, *patch)
    y = (torch.rand_like(x) > 0.95).float()
    fwd = flops_of(model, x)
    model.train()
    t_train = time_it(train_step_fn(model, x, y, precision), max(2, args.steps // 3), warmup=1)
    model.eval()
    t_inf = time_it(infer_fn(model, x, precision), max(2, args.steps // 3), warmup=1)
    return {"model": f"medanomaly UNet 3D w{width}, patch {'x'.join(map(str, patch))} (patches/s)",
            "precision": precision, "channels_last": False, "train_img_s": batch / t_train,
            "infer_img_s": batch / t_inf, "train_gflop_s": 3 * fwd / t_train / 1e9,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


LGG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg-flair"


def predict_rows(model_dir: Path, n: int) -> dict:
    """Latency of one 256x256 LGG slice (model loaded) and streamed slices/min over n slices."""
    import shutil
    import tempfile

    from medanomaly.infer.predictor import Predictor
    from medanomaly.infer.run import predict_paths
    from medanomaly.io import read_image

    slices = sorted(p for p in LGG.rglob("*_flair.png"))[:n]
    predictor = Predictor(model_dir)
    image = read_image(slices[len(slices) // 2])
    for _ in range(3):
        predictor.predict(image)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        predictor.predict(image)
        times.append(time.perf_counter() - t0)
    work = Path(tempfile.mkdtemp(prefix="speed-predict-"))
    try:
        (work / "in").mkdir()
        for k, f in enumerate(slices):
            (work / "in" / f"{k:05d}_{f.name}").symlink_to(f)
        t0 = time.perf_counter()
        res = predict_paths(model_dir, [work / "in"], work / "out", progress=False, dicom_seg=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"latency_ms": 1000 * sorted(times)[len(times) // 2], "shape": image.spatial_shape,
            "n": res["n_ok"], "slices_per_min": 60 * res["n_ok"] / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", type=Path, help="a trained 2D model directory: also measure predict on LGG slices")
    p.add_argument("--predict-n", type=int, default=1000, help="slices for the streamed predict throughput")
    args = p.parse_args()
    torch.manual_seed(0)
    from monai.networks.nets import BasicUNet

    bf16 = "bf16" if cpu_has_bf16() else "fp32"
    w = args.width
    rows = [
        bench_model(f"medanomaly UNet w{w}", UNet(UNetConfig(width=w)), args, bf16, True),
        bench_model(f"medanomaly UNet w{w}", UNet(UNetConfig(width=w)), args, "fp32", False),
        bench_model(f"MONAI BasicUNet w{w} (defaults)", BasicUNet(2, 1, 1, features=(w, w, 2 * w, 4 * w, 8 * w, w)),
                    args, "fp32", False),
        bench_model(f"MONAI BasicUNet w{w}", BasicUNet(2, 1, 1, features=(w, w, 2 * w, 4 * w, 8 * w, w)),
                    args, bf16, True),
    ]
    rows.append(bench_model(f"medanomaly UNet w{w}, torch.compile", UNet(UNetConfig(width=w)), args, bf16, True,
                            compile_=True))
    rows.append(bench_3d(args, bf16))  # "3D training patches/s": batch 2, as train --dim 3
    onnx_rate = onnx_infer_img_s(UNet(UNetConfig(width=w)), args)
    pk = peaks(args)
    aug = augment_cost(args)
    brk = step_breakdown(args, bf16)
    bw = memory_bandwidth()
    print(f"input {args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"CPU bf16: {cpu_has_bf16()}")
    print("| model | precision | channels-last | train img/s | infer img/s | train GFLOP/s | % of bf16 conv peak | params (M) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['channels_last']} | {r['train_img_s']:.1f} | {r['infer_img_s']:.1f} "
              f"| {r['train_gflop_s']:.0f} | {100 * r['train_gflop_s'] / pk['conv_bf16']:.0f}% | {r['params_M']:.2f} |")
    print(f"| medanomaly UNet w{w}, ONNX Runtime | fp32 | False | - | {onnx_rate:.1f} | - | - | "
          f"{rows[0]['params_M']:.2f} |")
    print()
    print("| peak | GFLOP/s |\n|---|---|")
    for k, v in pk.items():
        print(f"| {k} | {v:.0f} |")
    print(f"\ntraining step of the default (profiler, self time): {1000 * brk['step_s']:.0f} ms; convolutions "
          f"{1000 * brk['conv_s']:.0f} ms ({100 * brk['conv_s'] / brk['step_s']:.0f}%) at {brk['conv_gflop_s']:.0f} "
          f"GFLOP/s ({100 * brk['conv_gflop_s'] / pk['conv_bf16']:.0f}% of the bf16 conv peak); largest others: "
          + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in brk["others"]))
    print("memory bandwidth of a bf16 elementwise op (read + write): "
          + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    step = args.batch / rows[0]["train_img_s"]
    print(f"\naugmentation (all transforms on): {1000 * aug:.1f} ms per batch of {args.batch} "
          f"= {100 * aug / step:.1f}% of one default training step ({1000 * step:.0f} ms)")
    if args.model is not None and LGG.is_dir():
        pr = predict_rows(args.model, args.predict_n)
        print(f"\npredict, {args.model}: one {pr['shape'][0]}x{pr['shape'][1]} slice {pr['latency_ms']:.1f} ms "
              f"(median of 20, model loaded); streamed over {pr['n']} LGG slices: {pr['slices_per_min']:.0f} slices/min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
