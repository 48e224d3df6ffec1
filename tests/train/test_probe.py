"""What the planner measures (medanomaly.train.probe): real training steps timed on tiny phantoms, the
search over sizes, the machine, and the stand-in images where a fingerprint's folder is gone."""

from __future__ import annotations

import math

import pytest
import torch

from medanomaly.train.plan import make_plan
from medanomaly.train.probe import (
    SpeedMeter,
    fingerprint,
    largest_meeting,
    machine,
    probe_slices,
)

TINY = {"size": 32, "batch_size": 4, "model.width": 4, "model.depth": 2, "model.norm": "batch"}


def test_a_real_measurement_of_tiny_training_steps(phantoms):
    rng = torch.random.get_rng_state()
    meter = SpeedMeter(phantoms, "supervised", "cpu", "auto", 48)
    speed = meter(TINY)
    assert math.isfinite(speed) and speed > 0
    assert meter(dict(reversed(TINY.items()))) == speed and len(meter.cache) == 1  # measured once
    assert meter(TINY | {"size": 16, "model.depth": 1}) > 0 and len(meter.cache) == 2
    assert 0 < meter.spent < 60 and not meter.exhausted
    assert torch.equal(torch.random.get_rng_state(), rng)  # the run that follows draws what it would have


def test_the_anomaly_task_is_measured_with_its_own_loss(phantoms):
    meter = SpeedMeter(phantoms, "anomaly", "cpu", "auto", 32)
    assert meter(TINY) > 0


def test_make_plan_measures_this_machine_when_no_speed_is_given(phantoms):
    fp = fingerprint(phantoms, labelled_only=True)
    mach = machine("cpu")
    assert mach.device == "cpu" and mach.cores >= 1 and mach.gpu is None
    plan = make_plan(fp, mach, 1.0)
    assert plan.size == 48 and len(plan.speeds) == 1  # the median size is the only candidate (< 64)
    assert plan.speeds[0]["images_per_s"] == plan.images_per_s > 0 and plan.probe_seconds > 0
    assert plan.images_expected == plan.speeds[0]["images_expected"]


def test_without_its_folder_the_probe_measures_on_stand_in_images(tmp_path):
    s = probe_slices(tmp_path / "absent", "supervised", 32, "auto", channels=3)
    assert s.images.shape == (8, 3, 32, 32) and s.masks.shape == (8, 1, 32, 32) and bool(s.lesion.any())


@pytest.mark.parametrize("last", [-1, 0, 3, 7, 12])
def test_the_search_finds_the_largest_size_that_meets_with_few_measurements(last):
    sizes = list(range(64, 257, 16))
    tried = []

    def meets(size: int) -> bool:
        tried.append(size)
        return sizes.index(size) <= last

    assert largest_meeting(sizes, meets, lambda size: 100, lambda: False) == last
    # a useless guess costs the smallest, two guesses, the next size up, then bisection of 13 sizes
    assert len(tried) == len(set(tried)) <= 4 + math.ceil(math.log2(len(sizes)))


@pytest.mark.parametrize("answer", [64, 96, 128, 144, 256])
def test_a_guess_scaled_from_the_measured_speed_needs_three_measurements(answer):
    # time grows with the pixels (+10 % off, as measured speeds are): the second guess, from a size near
    # the answer, lands on it; one more measurement (the next size fails) confirms it
    sizes, tried = list(range(64, 257, 16)), []
    images = {s: 1.1 * 24_000 * (answer / s) ** 2 for s in sizes}  # images seen in the budget at size s

    def meets(size: int) -> bool:
        tried.append(size)
        return images[size] >= 24_000

    def guess(size: int) -> int:
        return int(size * math.sqrt(images[size] / 24_000))

    assert sizes[largest_meeting(sizes, meets, guess, lambda: False)] == answer
    assert len(tried) == len(set(tried)) <= 3


def test_the_search_stops_when_the_measuring_time_is_spent():
    sizes = list(range(64, 257, 16))
    tried = []
    found = largest_meeting(sizes, lambda s: tried.append(s) or True, lambda size: 100, lambda: len(tried) >= 2)
    assert tried == [64, 96] and found == sizes.index(96)  # the largest known to meet
