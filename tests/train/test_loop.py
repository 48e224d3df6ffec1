"""The one training loop (medanomaly.train.loop): 2D and 3D runs through the same ``fit``, a NaN
validation epoch and a non-finite step handled alike in both, the learning-rate schedule, and the
training options that the CLI tests do not reach: ``--compile``."""

from __future__ import annotations

import csv
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from medanomaly.apps.cli import main
from medanomaly.config import schema as config
from medanomaly.config.schema import TrainConfig
from medanomaly.infer.predictor import Predictor
from medanomaly.train import loop, run, sources

TINY = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "2", "--batch-size", "4", "--precision", "fp32",
        "--no-plan", "--device", "cpu"]


def _rows(model_dir: Path) -> list[dict]:
    with (model_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _losses(model_dir: Path) -> list[float]:
    return [float(r["train_loss"]) for r in _rows(model_dir)]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler for Inductor")
def test_compiled_training_matches_eager_and_saves_a_plain_model(phantoms, tmp_path):
    """Same seed, same batches: the compiled network computes the same losses up to float rounding
    (Inductor fuses and reorders; the first step is identical to ~1e-6, Adam then amplifies tiny
    differences of near-zero gradients, so the epoch means are compared to 1e-3), and model.pt is
    the eager network's state dict (no '_orig_mod.' prefix), loadable by predict."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["-q", "train", str(phantoms), "--out", str(eager), *TINY]) == 0
    assert main(["-q", "train", str(phantoms), "--out", str(compiled), "--compile", *TINY]) == 0
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-3)
    state = torch.load(compiled / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state)
    assert Predictor(compiled).model is not None


def test_compile_is_refused_for_3d(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--dim", "3", "--compile", "--no-plan"]) == 2
    assert "--compile" in capsys.readouterr().err


# --- one loop for 2D and 3D: NaN validation epochs, non-finite steps ---------------------------------

def _cfg(dim: int, **changes) -> TrainConfig:
    """A tiny run on the phantoms (4 slices of 48 x 48 per case): 2D slices at 32 x 32, or 3D
    patches of 4 x 16 x 16 voxels of the stacked slices; fp32, no time budget (step-based schedule)."""
    base = {"size": 32, "model.width": 4, "model.depth": 2, "epochs": 1, "batch_size": 4, "precision": "fp32",
            "max_minutes": 0}
    if dim == 3:
        base.update({"model.dim": 3, "model.norm": "instance", "patches_per_epoch": 4, "patch": (4, 16, 16)})
    return config.load(None, {**base, **changes})


SOURCE = {2: sources.SliceSource, 3: sources.PatchSource}


def test_2d_and_3d_runs_go_through_the_same_fit(phantoms, tmp_path, monkeypatch):
    seen = []

    def spy(model, opt, source, *args, **kwargs):
        seen.append(type(source).__name__)
        return loop.fit(model, opt, source, *args, **kwargs)

    assert run.fit is loop.fit
    monkeypatch.setattr(run, "fit", spy)
    for dim in (2, 3):
        res = run.train(phantoms, tmp_path / f"{dim}d", _cfg(dim), progress=False)
        assert res.epochs_run == 1 and (tmp_path / f"{dim}d" / "model.pt").is_file()
    assert seen == ["SliceSource", "PatchSource"]


@pytest.mark.parametrize("dim", [2, 3])
def test_a_nan_first_epoch_is_kept_and_beaten_by_a_number(dim, phantoms, tmp_path, monkeypatch):
    """The first epoch is kept even when its validation score is NaN (model.pt always exists); any
    later number beats a NaN best; a later NaN epoch is no improvement."""
    scores = iter([(math.nan, math.nan), (0.5, 0.25), (math.nan, math.nan)])
    monkeypatch.setattr(SOURCE[dim], "validate", lambda self, model: next(scores))
    out = tmp_path / "m"
    res = run.train(phantoms, out, _cfg(dim), progress=False)
    assert res.best_epoch == 0 and math.isnan(res.best_val_score)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    kept = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], state["model"][k]) for k in kept)
    res = run.train(phantoms, out, _cfg(dim, epochs=3), resume=True, progress=False)
    assert (res.best_epoch, res.best_val_score, res.epochs_run) == (1, 0.25, 3)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["bad_epochs"] == 1


@pytest.mark.parametrize("dim", [2, 3])
def test_a_step_with_non_finite_loss_or_gradients_is_skipped_with_one_warning(dim, phantoms, tmp_path, monkeypatch,
                                                                              caplog):
    real = SOURCE[dim].loss
    poisoned = {1}

    def loss(self, model, batch, gen, step):  # NaN loss, hence NaN gradients, at the poisoned steps
        value = real(self, model, batch, gen, step)
        return value * math.nan if step in poisoned else value

    monkeypatch.setattr(SOURCE[dim], "loss", loss)
    with caplog.at_level(logging.WARNING, logger="medanomaly.train.loop"):
        run.train(phantoms, tmp_path / "m", _cfg(dim), progress=False)
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warned == ["step 1: non-finite loss or gradients; step skipped"]
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 + (dim == 2)  # every step counted: 3 batches of 12 slices, 2 steps of 2 patches
    assert all(bool(v.isfinite().all()) for v in state["model"].values() if v.is_floating_point())
    assert math.isfinite(float(_rows(tmp_path / "m")[0]["train_loss"]))  # the mean of the steps taken

    poisoned.update(range(10))  # every step non-finite: the optimizer never stepped
    run.train(phantoms, tmp_path / "all", _cfg(dim), progress=False)
    state = torch.load(tmp_path / "all" / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["state"] == {} and _rows(tmp_path / "all")[0]["train_loss"] == "nan"


def test_the_finite_check_changes_nothing_when_all_is_finite(phantoms, tmp_path, monkeypatch):
    run.train(phantoms, tmp_path / "checked", _cfg(2, epochs=2), progress=False)
    monkeypatch.setattr(loop, "finite", lambda loss, model: True)
    run.train(phantoms, tmp_path / "unchecked", _cfg(2, epochs=2), progress=False)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("checked", "unchecked"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    drop = ("seconds", "images_per_s")
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "checked")]
            == [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "unchecked")])


def test_finite_looks_at_the_loss_and_every_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert loop.finite(torch.tensor(1.0), model)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # nothing changed
    assert not loop.finite(torch.tensor(math.inf), model)
    model[1].bias.grad[0] = math.nan
    assert not loop.finite(torch.tensor(1.0), model)
    model[1].bias.grad[0] = 1e30  # finite, though its squared norm overflows float32: not skipped
    assert loop.finite(torch.tensor(1.0), model)
    model[0].weight.grad[0, 0] = -math.inf
    assert not loop.finite(torch.tensor(1.0), model)


def test_the_learning_rate_warms_up_then_decays():
    cfg = config.load(None, {"lr": 0.01})
    assert loop.lr_at(cfg, 0, 4, 0.0) == pytest.approx(0.0025) and loop.lr_at(cfg, 3, 4, 0.0) == pytest.approx(0.01)
    assert loop.lr_at(cfg, 10, 4, 0.5) == pytest.approx(0.005) and loop.lr_at(cfg, 10, 4, 1.5) == pytest.approx(0.0)


# --- the time budget between steps, images seen, a run behind its plan --------------------------------

class FakeClock:
    """The loop's clock (loop.clock), advanced only by the test: steps take what the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _slow_steps(monkeypatch, source_cls, seconds: float) -> FakeClock:
    """Every training step of ``source_cls`` takes ``seconds`` on the loop's (fake) clock."""
    clock, real = FakeClock(), source_cls.loss

    def loss(self, *args):
        clock.now += seconds
        return real(self, *args)

    monkeypatch.setattr(loop, "clock", clock)
    monkeypatch.setattr(source_cls, "loss", loss)
    return clock


def test_the_time_budget_ends_the_run_between_steps(phantoms, tmp_path, monkeypatch):
    """0.5 min of 10-s steps: 3 of the epoch's 6 steps, then the partial epoch is validated and recorded,
    and the run is over (a resume trains nothing more)."""
    _slow_steps(monkeypatch, sources.SliceSource, 10.0)
    cfg, out = _cfg(2, epochs=5, batch_size=2, max_minutes=0.5), tmp_path / "m"
    res = run.train(phantoms, out, cfg, progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["step"], state["images_seen"], res.epochs_run, res.images_seen) == (3, 6, 1, 6)
    assert state["elapsed"] == res.seconds == pytest.approx(30.0)
    rows = _rows(out)
    assert len(rows) == 1 and float(rows[0]["images_per_s"]) == pytest.approx(6 / 30)
    assert (out / "model.pt").is_file() and run.run_record(out, cfg).ended
    again = run.train(phantoms, out, cfg, resume=True, progress=False)
    assert (again.epochs_run, again.images_seen) == (1, 6) and len(_rows(out)) == 1


def test_a_budget_never_reached_changes_no_number(phantoms, tmp_path, monkeypatch):
    """With the clock standing still, a 10-hour budget is never reached (nor does it move the schedule):
    the run with the budget checks before every step is the run without a budget, weight for weight."""
    run.train(phantoms, tmp_path / "none", _cfg(2, epochs=2), progress=False)
    monkeypatch.setattr(loop, "clock", FakeClock())
    run.train(phantoms, tmp_path / "budget", _cfg(2, epochs=2, max_minutes=600), progress=False)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("none", "budget"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (a["step"], a["images_seen"]) == (b["step"], b["images_seen"]) == (6, 24)


@pytest.mark.parametrize("dim, per_epoch", [(2, 12), (3, 4)])
def test_images_seen_are_counted_and_kept_across_resumes(dim, per_epoch, phantoms, tmp_path):
    out = tmp_path / "m"
    assert run.train(phantoms, out, _cfg(dim), progress=False).images_seen == per_epoch  # 3 x 4 slices, 2 x 2 patches
    res = run.train(phantoms, out, _cfg(dim, epochs=2), resume=True, progress=False)
    assert res.images_seen == 2 * per_epoch == torch.load(out / "checkpoint.pt", weights_only=True)["images_seen"]
    old = torch.load(out / "checkpoint.pt", weights_only=True)  # as an earlier release wrote it
    del old["images_seen"], old["val_seconds"]
    torch.save(old, out / "checkpoint.pt")
    res = run.train(phantoms, out, _cfg(dim, epochs=3), resume=True, progress=False)
    assert (res.epochs_run, res.images_seen) == (3, per_epoch)  # resumed; counted from the resume on


def test_a_run_behind_its_plan_says_so_once_with_the_numbers(phantoms, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medanomaly.train.loop"):
        run.train(phantoms, tmp_path / "behind", _cfg(2, epochs=3, max_minutes=60, plan_images_per_s=1e6),
                  progress=False)
        run.train(phantoms, tmp_path / "on-pace", _cfg(2, epochs=2, max_minutes=60, plan_images_per_s=1e-3),
                  progress=False)
    warned = [r.getMessage() for r in caplog.records if "the plan measured" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "below the 1000000.0 the plan measured" in warned[0] and "60.0-min budget" in warned[0]
    assert f"minimum {loop.MIN_IMAGES}" in warned[0]


def test_the_pace_warns_at_half_the_budget_within_the_first_epoch(caplog):
    state = loop.RunState(images_seen=100)
    pace = loop.Pace(planned=10.0, budget=600.0)
    with caplog.at_level(logging.WARNING, logger="medanomaly.train.loop"):
        pace.check(state, 300.0, images=100, seconds=300.0)  # 0.33 img/s of the 10 measured
        pace.check(state, 400.0, images=150, seconds=400.0)
    [message] = [r.getMessage() for r in caplog.records]
    assert "training at 0.3 images/s" in message and "~200 images" in message and "instead of ~6000" in message
