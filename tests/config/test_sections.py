"""Tests for medanomaly.config.sections: each section of a configuration checks its own values (the
error names the field, the bad value and the valid ones) and round-trips through its dict."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from medanomaly.anomaly.methods import AnomalyConfig
from medanomaly.config.schema import load
from medanomaly.config.sections import (
    AugmentConfig,
    ConfigError,
    GanConfig,
    PostprocessParams,
    UNetConfig,
    check_nonneg_int,
)
from medanomaly.core.errors import MedanomalyError
from medanomaly.models.unet import UNetConfig as FromModels
from medanomaly.train.gan import GanConfig as FromGan


def test_check_nonneg_int() -> None:
    assert check_nonneg_int(0, "n") == 0 and check_nonneg_int(np.int64(3), "n") == 3
    assert type(check_nonneg_int(np.int64(3), "n")) is int
    for bad in (-1, 1.0, True, "2", None):
        with pytest.raises(ValueError, match=f"n must be a non-negative integer, got {bad!r}"):
            check_nonneg_int(bad, "n")


def test_config_error_is_both_a_user_error_and_a_value_error() -> None:
    assert issubclass(ConfigError, MedanomalyError) and issubclass(ConfigError, ValueError)
    assert FromModels is UNetConfig  # the models re-export the one class


def test_unet_dim_is_2_or_3():
    with pytest.raises(ValueError, match="dim must be 2 or 3"):
        UNetConfig(dim=4)
    with pytest.raises(MedanomalyError, match="dim must be 2 or 3"):
        load(None, {"model.dim": 1})


def test_config_to_dict_round_trip():
    cfg = UNetConfig(width=8, depth=3, norm="group", dim=3)
    assert UNetConfig(**cfg.to_dict()) == cfg


def test_unknown_method_lists_valid_keys():
    with pytest.raises(MedanomalyError, match="denoise, identity, intensity"):
        AnomalyConfig(method="vae")


def test_unknown_residual_lists_valid_ones() -> None:
    with pytest.raises(MedanomalyError, match="unknown residual 'squared'; valid: abs, positive, negative"):
        AnomalyConfig(residual="squared")


def test_params_round_trip_and_validation() -> None:
    p = PostprocessParams(threshold=0.3, min_size=5, fill_holes=True)
    assert PostprocessParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="valid keys"):
        PostprocessParams.from_dict({"threshold": 0.3, "min_sise": 5})
    with pytest.raises(ValueError, match="min_size"):
        PostprocessParams(min_size=-1)
    with pytest.raises(ValueError, match="fill_holes"):
        PostprocessParams(fill_holes="yes")


@pytest.mark.parametrize("threshold", [float("nan"), True, "0.5", None])
def test_threshold_must_be_a_number(threshold) -> None:
    with pytest.raises(ValueError, match="threshold must be a number"):
        PostprocessParams(threshold=threshold)


def test_postprocess_accepts_numpy_values() -> None:
    p = PostprocessParams(threshold=np.float32(0.25), min_size=np.int64(2), foreground_only=np.bool_(True))
    assert p.threshold == 0.25 and p.min_size == 2 and p.foreground_only
    with pytest.raises(ValueError, match="smooth_radius"):
        PostprocessParams(smooth_radius=1.5)
    with pytest.raises(ValueError, match=r"foreground_only must be true or false \(got 1\)"):
        PostprocessParams(foreground_only=1)


def test_gan_config_lives_in_config_and_validates():
    assert FromGan is GanConfig  # one class: the CLI quotes its defaults without importing torch
    with pytest.raises(MedanomalyError, match="unknown precision 'fp8'; valid: auto, bf16, fp32"):
        GanConfig(precision="fp8")
    with pytest.raises(MedanomalyError, match=r"size must be an integer in \[16, 4096\] \(got 8\)"):
        GanConfig(size=8)


def test_gan_config_lists_every_bad_size_at_once() -> None:
    with pytest.raises(MedanomalyError, match=r"GAN settings: batch_size must be an integer in \[1, 4096\] \(got 0\); "
                                              r"margin must be an integer in \[0, 4096\] \(got -1\)"):
        GanConfig(batch_size=0, margin=-1)
    GanConfig(size=16, batch_size=1, max_steps=1, width=1, depth=1, d_width=1, d_layers=1, margin=0)  # the least


@pytest.mark.parametrize("section", [UNetConfig, AugmentConfig, AnomalyConfig, PostprocessParams, GanConfig])
def test_sections_are_frozen_and_their_dicts_are_json(section) -> None:
    cfg = section()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    data = json.loads(json.dumps(cfg.to_dict()))  # tuples come back as lists
    assert section(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}) == cfg
