"""The planner: fingerprints of small hand-checkable folders, the plan's rules, plan.json, and
`medanomaly plan` + a tiny `train --plan` on the real data sets."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.apps.cli import main
from medanomaly.config import schema as config
from medanomaly.core.errors import MedanomalyError
from medanomaly.train.plan import (
    MIN_SAMPLES,
    DataFingerprint,
    MachineInfo,
    Plan,
    fingerprint,
    for_run,
    load_plan,
    make_plan,
    save_plan,
)

DATA = Path(os.environ["MEDANOMALY_SHARED_DATA"])  # resolved by tests/conftest.py
CPU2 = MachineInfo(cores=2, memory_gib=16.0, bf16=True)


def _png(path: Path, shape: tuple[int, ...], lesion: int | None = None) -> None:
    """An 8-bit image (a bright disc on black) and, with ``lesion``, a mask of that many pixels."""
    h, w = shape[:2]
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2) * 200
    img = np.stack([disc] * shape[2], -1) if len(shape) == 3 else disc
    PILImage.fromarray(img.astype(np.uint8)).save(path)
    if lesion is not None:
        m = np.zeros((h, w), np.uint8)
        m.flat[:lesion] = 255
        PILImage.fromarray(m).save(path.with_name(path.stem + "_mask.png"))


def _nifti(path: Path, zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]) -> None:
    data = np.random.default_rng(0).normal(100, 10, zyx[::-1]).astype(np.float32)  # stored (X, Y, Z)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing_zyx[::-1], 1.0])), str(path))


def reference_speed(mach: MachineInfo) -> Callable[[int, int, int], float]:
    """Training images/s of (size, width, batch) on a machine like the one README's Speed table measured
    (30 img/s at 128 px, width 32, on 2 bf16 cores; fp32 3.6x slower; a GPU 2000 img/s), time growing
    with the pixels and the width squared: injected, so the plan's rules are tested without measuring."""
    base = 2000.0 if mach.gpu else 30.0 * mach.cores / 2 * (1.0 if mach.bf16 else 8.4 / 30.3)
    return lambda size, width, batch: base * (128 / size) ** 2 * (32 / width) ** 2


def _plan(fp: DataFingerprint, mach: MachineInfo = CPU2, minutes: float = 25.0, task: str = "supervised") -> Plan:
    return make_plan(fp, mach, minutes, task, speed=reference_speed(mach))


def _lgg_like(**changes) -> DataFingerprint:
    """The fingerprint of lgg-flair (80 patients, 256x256 8-bit FLAIR, lesion in 38 % of slices)."""
    fp = DataFingerprint("lgg", 80, 3009, 3009, 3009, 2363, 2363, 333, 100, False, (256, 256), None, 1, ("raster",),
                         True, {"p0.5": 0, "p50": 5, "p99.5": 154, "mean": 21, "std": 31}, 0.33, 0.011, 0.38, True)
    return replace(fp, **changes)


def test_fingerprint_of_a_small_png_folder(tmp_path):
    for i, (shape, lesion) in enumerate([((32, 48), 40), ((32, 48), 0), ((48, 64), 100)]):
        _png(tmp_path / f"case{i}.png", shape, lesion)
    _png(tmp_path / "unlabelled.png", (64, 64))
    fp_all = fingerprint(tmp_path)
    assert (fp_all.n_images, fp_all.n_labelled, fp_all.median_shape) == (4, 3, (40, 56))
    fp = fingerprint(tmp_path, labelled_only=True)  # what supervised training uses
    assert (fp.n_cases, fp.n_images, fp.n_labelled, fp.n_slices, fp.n_sampled) == (3, 3, 3, 3, 3)
    assert fp.median_shape == (32, 48) and fp.median_spacing is None and not fp.is_3d
    assert fp.channels == 1 and fp.eight_bit and fp.has_masks and fp.kinds == ("raster",)
    assert fp.class_ratio == pytest.approx(140 / (2 * 32 * 48 + 48 * 64))
    assert fp.lesion_slice_fraction == pytest.approx(2 / 3)
    assert fp.n_train_slices + fp.n_val_slices <= 3 and 0 < fp.foreground_ratio < 1
    assert fp.intensity["p0.5"] == 0 and fp.intensity["p99.5"] == 200


def test_fingerprint_rgb_and_no_masks(tmp_path):
    for i in range(3):
        _png(tmp_path / f"skin{i}.png", (40, 40, 3))
    fp = fingerprint(tmp_path)
    assert fp.channels == 3 and not fp.has_masks and fp.class_ratio is None and fp.lesion_slice_fraction is None
    with pytest.raises(MedanomalyError, match="--task"):
        _plan(fp, CPU2, 25, "supervised")
    assert _plan(fp, CPU2, 25, "anomaly").positive_fraction is None


def test_isotropic_volumes_recommend_3d_anisotropic_2d(tmp_path):
    iso, aniso = tmp_path / "iso", tmp_path / "aniso"
    iso.mkdir(), aniso.mkdir()
    for i in range(2):
        _nifti(iso / f"v{i}.nii.gz", (48, 48, 48), (1.0, 1.0, 1.0))
        _nifti(aniso / f"v{i}.nii.gz", (24, 96, 96), (3.0, 1.0, 1.0))  # 3:1 spacing, 24 slices
    fp_iso, fp_aniso = fingerprint(iso), fingerprint(aniso)
    assert fp_iso.is_3d and fp_iso.median_shape == (48, 48, 48) and fp_iso.median_spacing == (1.0, 1.0, 1.0)
    assert fp_aniso.median_spacing == (3.0, 1.0, 1.0) and fp_aniso.n_slices == 48
    p_iso, p_aniso = _plan(fp_iso, CPU2, 25, "anomaly"), _plan(fp_aniso, CPU2, 25, "anomaly")
    assert p_iso.recommended_dim == 3 and any("train --dim 3" in n for n in p_iso.notes)
    assert p_aniso.recommended_dim == 2 and "anisotropic" in p_aniso.why["dim"]
    assert p_iso.size == 48 and p_iso.depth == 2 and p_aniso.size == 96 and p_aniso.depth == 3  # 2D trainer's inputs
    assert p_iso.normalization == "percentile"


def test_lgg_plan_on_the_reference_machine():
    # 30 img/s at 128 px (the README's fast machine): 160 px is the largest that sees MIN_SAMPLES in 25 min
    plan = _plan(_lgg_like(), CPU2, 25, "supervised")
    cfg = config.load(None, plan.to_config_overrides())
    default = config.TrainConfig()
    assert (cfg.size, cfg.batch_size, cfg.model.width, cfg.model.depth, cfg.model.norm) == (160, 16, 32, 4, "batch")
    assert (cfg.normalization, cfg.positive_fraction, cfg.max_minutes) == (default.normalization, 0.5, 25.0)
    assert 10 <= plan.epochs_estimate <= 14 and plan.images_expected >= MIN_SAMPLES
    assert "setting" in plan.table() and "model.width" in plan.table()


def test_plan_rules_memory_time_gpu_ct():
    roomy, small = _plan(_lgg_like(), CPU2, 25), _plan(_lgg_like(), replace(CPU2, memory_gib=1.0), 25)
    assert small.batch_size < roomy.batch_size and small.norm == "instance"  # batch norm needs >= 8
    with pytest.raises(MedanomalyError, match="memory"):
        _plan(_lgg_like(), replace(CPU2, memory_gib=0.05), 25)
    quick = _plan(_lgg_like(), CPU2, 5)
    assert quick.size < roomy.size and quick.size >= 64  # a short budget: smaller inputs
    fp32 = _plan(_lgg_like(), replace(CPU2, bf16=False), 25)
    assert fp32.size < roomy.size  # 3.6x slower without bf16: smaller inputs fit the budget
    gpu = _plan(_lgg_like(), replace(CPU2, gpu="Test GPU", gpu_memory_gib=80.0), 25)
    assert gpu.width == 64 and gpu.size == 256 and gpu.depth == 5 and gpu.batch_size <= 64
    few = _plan(_lgg_like(n_train_labelled=100, n_train_slices=100), CPU2, 25)
    assert few.batch_size == 8  # at most 5 % of the data per batch, but >= 8 for batch norm
    ct = _plan(_lgg_like(eight_bit=False, intensity={**_lgg_like().intensity, "p0.5": -1024.0}), CPU2, 25)
    assert ct.normalization == "ct"
    most = _plan(_lgg_like(lesion_slice_fraction=0.9), CPU2, 25)
    assert most.positive_fraction == 0.0


def test_plan_json_round_trip_and_bad_file(tmp_path):
    plan = _plan(_lgg_like(), CPU2, 25)
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    (tmp_path / "bad.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(MedanomalyError, match="medanomaly plan"):
        load_plan(tmp_path / "bad.json")


def _scaled(at_128: float) -> Callable[[int, int, int], float]:
    return lambda size, width, batch: at_128 * (128 / size) ** 2


def test_a_fast_machine_plans_larger_inputs_a_slow_one_smaller():
    fast, slow = _lgg_like(), _lgg_like()
    fast, slow = make_plan(fast, CPU2, 25, speed=_scaled(120.0)), make_plan(slow, CPU2, 25, speed=_scaled(15.0))
    assert fast.size == 256 and fast.depth == 5 and slow.size == 112 and slow.depth == 3
    assert fast.images_expected >= MIN_SAMPLES and slow.images_expected >= MIN_SAMPLES
    assert slow.images_per_s == pytest.approx(15.0 * (128 / 112) ** 2, rel=1e-3)
    assert fast.to_config_overrides()["plan_images_per_s"] == fast.images_per_s  # the loop compares the run with it


def test_the_size_is_the_largest_whose_measured_speed_sees_the_minimum():
    calls = []

    def speed(size, width, batch):
        calls.append((size, width, batch))
        return 24.0 * (128 / size) ** 2

    plan = make_plan(_lgg_like(), CPU2, 25, speed=speed)
    expected = {s["size"]: s["images_expected"] for s in plan.speeds}
    assert plan.size == 144 and expected[144] == plan.images_expected >= MIN_SAMPLES > expected[160]
    assert all(v < MIN_SAMPLES for size, v in expected.items() if size > plan.size)
    assert len(calls) == len(set(calls)) <= 5 < len(range(64, 257, 16))  # a search, each measured once
    assert all(b == plan.batch_size == 16 and w == plan.width == 32 for _, w, b in calls)
    table = plan.table()
    assert "measured 144 px, w32, b16" in table and f"{plan.images_per_s:.1f} img/s" in table
    assert f"{plan.images_expected:,}" in table and f"minimum {MIN_SAMPLES:,}" in table


def test_a_budget_too_short_for_the_minimum_takes_the_smallest_size_and_says_so():
    plan = make_plan(_lgg_like(), CPU2, 25, speed=lambda size, width, batch: 5.0)
    assert plan.size == 64 and plan.images_expected < MIN_SAMPLES and len(plan.speeds) == 1
    assert any(f"fewer than the {MIN_SAMPLES:,}" in n and re.search(r"--max-minutes \d+", n) for n in plan.notes)


def test_on_a_gpu_the_measurement_decides_size_and_width():
    gpu = replace(CPU2, gpu="Test GPU", gpu_memory_gib=80.0)
    wide = make_plan(_lgg_like(), gpu, 25, speed=lambda s, w, b: 4000.0 * (128 / s) ** 2 * (32 / w) ** 2)
    assert (wide.size, wide.width, wide.batch_size) == (256, 64, 64)
    narrow = make_plan(_lgg_like(), gpu, 25, speed=lambda s, w, b: 4000.0 * (128 / s) ** 2 if w == 32 else 1.0)
    assert (narrow.size, narrow.width) == (256, 32)  # width 64 measured too slow: not assumed affordable
    slow = make_plan(_lgg_like(), gpu, 25, speed=lambda s, w, b: 20.0 * (128 / s) ** 2 * (32 / w) ** 2)
    assert (slow.size, slow.width) == (128, 32)  # a slow GPU plans as what it is


def test_plan_json_of_the_first_version_is_refused(tmp_path):
    path = save_plan(_plan(_lgg_like()), tmp_path / "plan.json")
    old = json.loads(path.read_text())
    for key in ("images_expected", "min_images", "speeds", "probe_seconds"):
        old.pop(key)
    (tmp_path / "v1.json").write_text(json.dumps(old | {"version": 1}))
    with pytest.raises(MedanomalyError, match="version 1, expected 2.*medanomaly plan"):
        load_plan(tmp_path / "v1.json")


def test_the_measured_speed_reaches_the_run_only_with_the_plans_settings(tmp_path):
    plan = _plan(_lgg_like())
    path = save_plan(plan, tmp_path / "plan.json")
    _, overrides = for_run(tmp_path, None, path, None, {"max_minutes": 10.0})
    assert overrides["plan_images_per_s"] == plan.images_per_s
    for flags in ({"size": 96}, {"batch_size": 4}, {"precision": "fp32"}, {"model.width": 8}, {"init": "x"}):
        _, overrides = for_run(tmp_path, None, path, None, flags)
        assert "plan_images_per_s" not in overrides, flags


def test_precedence_defaults_plan_config_flags(tmp_path):
    plan = _plan(_lgg_like(), CPU2, 25)
    path = save_plan(plan, tmp_path / "plan.json")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"size": 96, "model": {"depth": 3}}))
    flags = {"batch_size": 4, "max_minutes": 50.0, "lr": None}
    _, overrides = for_run(tmp_path, None, path, cfg_file, flags)
    cfg = config.load(cfg_file, overrides)
    assert (cfg.size, cfg.model.depth) == (96, 3)  # the config file beats the plan
    assert (cfg.batch_size, cfg.max_minutes) == (4, 50.0)  # flags beat both
    assert cfg.model.width == plan.width and cfg.epochs == math.ceil(plan.epochs * 2)  # epochs follow the budget
    _, overrides = for_run(tmp_path, None, path, None, {"init": "pretrained"})
    assert "model.width" not in overrides and overrides["size"] == plan.size  # --init keeps its architecture


def test_train_makes_a_plan_by_default_and_no_plan_keeps_defaults(tmp_path):
    data = tmp_path / "data"
    for c in range(4):
        (data / f"c{c}").mkdir(parents=True)
        for k in range(3):
            _png(data / f"c{c}" / f"c{c}_{k}.png", (32, 32), 30 * k)
    (data / "splits.json").write_text(json.dumps({"train": ["c0", "c1"], "val": ["c2"], "test": ["c3"]}))
    tiny = ["--epochs", "1", "--width", "4", "--device", "cpu"]
    assert main(["-q", "train", str(data), "--out", str(tmp_path / "m"), *tiny]) == 0
    cfg, saved = json.loads((tmp_path / "m" / "config.json").read_text()), load_plan(tmp_path / "m" / "plan.json")
    assert cfg["size"] == saved.size == 32 and cfg["model"]["depth"] == saved.depth == 2 and cfg["model"]["width"] == 4
    assert cfg["batch_size"] == saved.batch_size == 6  # all 6 training slices
    assert main(["-q", "train", str(data), "--out", str(tmp_path / "d"), "--no-plan", *tiny]) == 0
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["size"] == 128 and cfg["batch_size"] == 16 and not (tmp_path / "d" / "plan.json").exists()


def _link_subset(src: Path, dst: Path, files: list[Path]) -> None:
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f)


def _lgg_subset(dst: Path) -> Path:
    """Three real LGG patients, three slices each (two with tumour)."""
    root, splits = DATA / "lgg-flair", json.loads((DATA / "lgg-flair" / "splits.json").read_text())
    patients = {"train": splits["train"][:2], "val": splits["val"][:1], "test": []}
    for p in patients["train"] + patients["val"]:
        masks = sorted((root / p).glob("*_mask.png"), key=lambda m: int(m.stem.split("_")[-2]))
        chosen = dict.fromkeys([m for m in masks if np.asarray(PILImage.open(m)).any()][:2] + masks[:1])
        _link_subset(root, dst, [f for m in chosen for f in (m, m.with_name(m.name.replace("_mask", "_flair")))])
    (dst / "splits.json").write_text(json.dumps(patients))
    return dst


def _ph2_subset(dst: Path) -> Path:
    """Six real PH2 images with their masks (images/ + masks/): 4 train, 1 val, 1 test by the seeded split."""
    images = sorted((DATA / "ph2" / "images").iterdir())[:6]
    _link_subset(DATA / "ph2", dst, images + [DATA / "ph2" / "masks" / (i.stem + ".png") for i in images])
    return dst


def _ixi_subset(dst: Path) -> Path:
    """Three real IXI volumes cut to six slices each (in-plane size and spacing kept)."""
    dst.mkdir(parents=True)
    for v in sorted((DATA / "volumes" / "ixi-t1-healthy").glob("*.nii.gz"))[:3]:
        img = nib.load(v)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 40:46], img.affine, img.header), str(dst / v.name))
    return dst


def _brain_subset(dst: Path) -> Path:
    """The two labelled NRRD volumes of volumes/ (25 and 23 slices of 6.5 mm, 0.78 mm pixels)."""
    _link_subset(DATA / "volumes", dst, sorted((DATA / "volumes").glob("brain*.nrrd")))
    return dst


REAL = {"lgg-flair": ("lgg-flair", _lgg_subset), "ph2": ("ph2", _ph2_subset),
        "ixi": ("volumes/ixi-t1-healthy", _ixi_subset), "volumes": ("volumes", _brain_subset)}
DIMS = {"lgg-flair": 2, "ph2": 2, "ixi": 3, "volumes": 2}  # volumes: the labelled brains are anisotropic (6.5 mm)


@pytest.mark.parametrize("name", list(REAL))
def test_cli_plan_on_real_data_then_a_tiny_train_with_it(name, tmp_path, capsys, shared_data):
    sub, subset = REAL[name]
    data = shared_data(sub)
    assert main(["-q", "plan", str(data), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("setting") and "batch_size" in out and "plan written to" in out
    plan = load_plan(tmp_path / "plan.json")
    assert plan.task == ("anomaly" if name == "ixi" else "supervised") and plan.recommended_dim == DIMS[name]
    small = subset(tmp_path / "small")
    model = tmp_path / "model"
    assert main(["-q", "train", str(small), "--out", str(model), "--plan", str(tmp_path / "plan.json"),
                 "--epochs", "1", "--max-minutes", "0.05", "--device", "cpu"]) == 0
    cfg = json.loads((model / "config.json").read_text())
    assert (cfg["size"], cfg["batch_size"], cfg["model"]["width"], cfg["model"]["depth"], cfg["task"]) == (
        plan.size, plan.batch_size, plan.width, plan.depth, plan.task)
    assert load_plan(model / "plan.json") == plan and (model / "model.json").is_file()
