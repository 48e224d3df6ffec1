"""Bad inputs of the measured plan: a plan.json of the first (unmeasured) version given to --plan, and
a configuration file with an impossible planned speed. Each is refused before anything is read or
written, with what is wrong and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def world(tmp_path: Path, labelled_phantoms) -> dict[str, Path]:
    data = labelled_phantoms(tmp_path / "data")
    outs = tmp_path / "outs"
    outs.mkdir()
    return {"data": data, "outs": outs, "out": outs / "model", "files": tmp_path / "files"}


def test_bad_plan_file_of_the_first_version(cli, world) -> None:
    """A plan saved before plans measured the machine (version 1: an assumed speed)."""
    world["files"].mkdir()
    old = world["files"] / "plan.json"
    old.write_text(json.dumps({"version": 1, "task": "supervised", "size": 128}))
    cli.refuses("train", world["data"], "--out", world["out"], "--plan", old,
                says=r"cannot read plan file .*plan\.json: version 1, expected 2; re-create it with 'medanomaly plan",
                untouched=(world["data"], world["outs"], world["files"]))


@pytest.mark.parametrize("value", [-5, 0, "fast"])
def test_bad_planned_speed_in_a_config_file(cli, world, value) -> None:
    world["files"].mkdir()
    cfg = world["files"] / "cfg.json"
    cfg.write_text(json.dumps({"plan_images_per_s": value}))
    cli.refuses("train", world["data"], "--out", world["out"], "--config", cfg, "--no-plan",
                says=r"plan_images_per_s must be a number in \(0, 1000000000\], or null",
                untouched=(world["data"], world["outs"], world["files"]))
