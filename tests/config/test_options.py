"""Tests for medanomaly.config.options: every option list is a non-empty tuple of distinct values, each
default of the configuration lies in its list, and the configuration accepts exactly the listed values."""

from __future__ import annotations

import pytest

from medanomaly.config import options as O
from medanomaly.config.schema import TrainConfig, default, load
from medanomaly.config.sections import GanConfig
from medanomaly.core.errors import MedanomalyError

OPTION_LISTS = {name: value for name, value in vars(O).items() if name.isupper() and isinstance(value, tuple)}

#: the configuration key that each option list validates
KEYS = {"TASKS": "task", "OPTIMIZERS": "optimizer", "PRECISIONS": "precision", "LOSSES": "loss",
        "UNLABELLED_METHODS": "unlabelled_method", "NORMS": "model.norm", "ENCODERS": "model.encoder",
        "DIMS": "model.dim", "ANOMALY_METHODS": "anomaly.method", "RESIDUALS": "anomaly.residual",
        "NORMALIZATIONS": "normalization"}


def test_every_option_list_is_a_non_empty_tuple_of_distinct_values() -> None:
    assert set(KEYS) | {"RUNTIMES", "EXPORT_FORMATS", "SECTIONS"} <= set(OPTION_LISTS)
    for name, values in OPTION_LISTS.items():
        assert values, name
        assert len(set(values)) == len(values), name
        assert all(isinstance(v, str) for v in values) or name == "DIMS", name
    assert O.DIMS == (2, 3) and O.RUNTIMES[0] == "torch"  # the first runtime is predict's default


@pytest.mark.parametrize("name", sorted(KEYS))
def test_the_default_lies_in_its_list(name: str) -> None:
    assert default(KEYS[name]) in OPTION_LISTS[name]


def test_defaults_of_the_gan_and_the_few_label_remedy_lie_in_their_lists() -> None:
    assert GanConfig().normalization in O.NORMALIZATIONS and GanConfig().precision in O.PRECISIONS
    assert O.DEFAULT_UNLABELLED_METHOD in O.UNLABELLED_METHODS and O.DEFAULT_UNLABELLED_METHOD != "auto"
    assert O.SECTIONS == tuple(k for k, v in TrainConfig().to_dict().items() if isinstance(v, dict))


@pytest.mark.parametrize("name", sorted(KEYS))
def test_the_config_accepts_every_listed_value_and_nothing_else(name: str) -> None:
    key = KEYS[name]
    for value in OPTION_LISTS[name]:
        got = load(None, {key: value})
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value
    with pytest.raises(MedanomalyError):
        load(None, {key: "not-an-option" if name != "DIMS" else 1})
