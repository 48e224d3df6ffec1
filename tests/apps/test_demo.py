"""``medanomaly demo``'s budget: DEMO_MAX_MINUTES on the phantoms, TrainConfig's with --data (the
values its help quotes); the end-to-end run is in test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from medanomaly.apps import demo
from medanomaly.config.schema import DEMO_MAX_MINUTES, TrainConfig


@pytest.fixture
def budgets(monkeypatch, tmp_path) -> list[float]:
    """run_demo with training and evaluation replaced by recorders: the budgets it trained with."""
    seen: list[float] = []
    monkeypatch.setattr(demo, "make_phantoms", lambda out, seed: tmp_path)
    monkeypatch.setattr(demo, "train_with_config", lambda data, out, cfg, **kw: seen.append(cfg.max_minutes))
    monkeypatch.setattr(demo, "evaluate_model", lambda *a, **kw: {})
    monkeypatch.setattr(demo, "check_test_split", lambda *a, **kw: None)  # "real" is no folder: only budgets here
    return seen


@pytest.mark.parametrize(("data", "given", "expected"), [
    (None, None, DEMO_MAX_MINUTES), (None, 0.5, 0.5), (Path("real"), None, TrainConfig.max_minutes),
    (Path("real"), 3.0, 3.0)])
def test_demo_budget(budgets, tmp_path, data, given, expected):
    demo.run_demo(tmp_path / "out", data=data, max_minutes=given, progress=False)
    assert budgets == [expected]
