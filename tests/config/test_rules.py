"""Tests for medanomaly.config.rules: the one schema of every configuration value. Each field of
every configuration dataclass declares a rule; the rules accept the defaults, refuse other types
without coercing them, refuse NaN/inf where a finite number is meant, and their messages name the
key, the value and what is allowed. A property test builds every dataclass with one invalid value."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.config.rules import (
    ConfigError,
    Rule,
    check,
    describe,
    item_rule,
    parse,
    problem,
    rules_of,
    valid,
)
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import (
    AnomalyConfig,
    AugmentConfig,
    GanConfig,
    PostprocessParams,
    UNetConfig,
)

CONFIGS = (TrainConfig, UNetConfig, AugmentConfig, AnomalyConfig, PostprocessParams, GanConfig)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_declares_a_rule_that_its_default_follows(cls) -> None:
    rules, default = rules_of(cls), cls()
    assert set(rules) == {f.name for f in dataclasses.fields(cls)}
    for name, rule in rules.items():
        assert valid(rule, getattr(default, name)), name


@pytest.mark.parametrize(("rule", "text"), [
    (Rule("int", ge=1, le=1024), "an integer in [1, 1024]"),
    (Rule("float", gt=0, le=10), "a number in (0, 10]"),
    (Rule("float", ge=0), "a finite number >= 0"),
    (Rule("float", gt=0, lt=1), "a number in (0, 1)"),
    (Rule("int", le=5), "an integer <= 5"),
    (Rule("int", choices=(2, 3)), "2 or 3"),
    (Rule("str", choices=("a", "b", "c")), "one of a, b, c"),
    (Rule("bool"), "true or false"),
    (Rule("float", length=2, ordered=True, gt=0, le=10), "a list of 2 numbers in (0, 10], low <= high"),
    (Rule("int", length=3, ge=1, nullable=True), "a list of 3 integers >= 1, or null"),
    (Rule("str", what="a path", nullable=True), "a path, or null"),
])
def test_describe(rule: Rule, text: str) -> None:
    assert describe(rule) == text


def test_no_coercion_and_no_nan() -> None:
    integer, number, flag = Rule("int", ge=0), Rule("float", ge=0, le=1), Rule("bool")
    assert valid(integer, 3) and valid(integer, np.int64(3)) and valid(integer, 10**30)
    for bad in (True, 2.0, 2.5, "2", None, [2], np.bool_(True)):
        assert not valid(integer, bad), bad
    assert valid(number, 1) and valid(number, np.float32(0.5)) and valid(number, 0.0)
    for bad in (math.nan, math.inf, True, "0.5", None, 1.5, -0.1):
        assert not valid(number, bad), bad
    assert valid(flag, True) and valid(flag, np.bool_(False)) and not valid(flag, 1) and not valid(flag, "true")
    assert not valid(Rule("float", ge=0), math.inf) and valid(Rule("float", finite=False), -math.inf)
    assert not valid(Rule("float", finite=False), math.nan)


def test_lists_are_checked_element_by_element_and_in_order() -> None:
    pair = Rule("float", length=2, ordered=True, gt=0)
    assert valid(pair, (0.5, 1.5)) and valid(pair, [1, 1])
    for bad in ((1.5, 0.5), (0.5,), (0.5, 1.0, 2.0), (0.0, 1.0), "ab", 1.0, (0.5, math.nan), None):
        assert not valid(pair, bad), bad
    assert item_rule(pair) == Rule("float", gt=0)


def test_strings_are_never_empty_and_follow_their_pattern() -> None:
    device = Rule("str", pattern=r"auto|cpu|cuda(:\d{1,3})?")
    assert valid(device, "cuda:1") and not valid(device, "cuda:") and not valid(device, "tpu")
    assert not valid(Rule("str"), "") and valid(Rule("str", nullable=True), None)


def test_messages_name_the_key_the_value_and_what_is_allowed() -> None:
    assert problem("lr", Rule("float", gt=0, le=10), "fast") == "lr must be a number in (0, 10] (got 'fast')"
    assert problem("model.norm", Rule("str", choices=("batch", "group")), "layer") == (
        "unknown norm 'layer' (model.norm); valid: batch, group")
    assert problem("x", Rule("int", ge=1, hint="use 1"), 0) == "x must be an integer >= 1 (got 0); use 1"
    assert problem("x", Rule("int"), np.int64(3)) is None
    assert problem("name", Rule("int"), "y" * 100).endswith("(got 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy...)")


def test_check_lists_every_bad_field_at_once() -> None:
    with pytest.raises(ConfigError, match=r"^GAN settings: size must be an integer in \[16, 4096\] \(got 8\); "
                                          r"lr must be a number in \(0, 10\] \(got 0\)$"):
        GanConfig(size=8, lr=0)
    assert issubclass(ConfigError, ValueError)
    check(GanConfig())  # nothing to say


def test_parse_converts_command_line_text() -> None:
    assert parse(Rule("int", ge=1), "12") == 12 and parse(Rule("float", gt=0), "1e-3") == 0.001
    assert parse(Rule("str", pattern="a+"), "aaa") == "aaa"
    for rule, text, got in [(Rule("int", ge=1), "2.5", "'2.5'"), (Rule("int", ge=1), "0", "0"),
                            (Rule("float", gt=0), "nan", "nan"), (Rule("float", gt=0), "", "''")]:
        with pytest.raises(ConfigError, match=rf"^must be .* \(got {got}\)$"):
            parse(rule, text)


def _invalid(rule: Rule) -> st.SearchStrategy:
    """Values of other types, at and beyond the bounds, NaN/inf, that ``rule`` refuses: the test
    checks that construction enforces each field's rule and names the field."""
    wrong = st.one_of(st.text(), st.booleans(), st.integers(), st.lists(st.integers(), max_size=3), st.none(),
                      st.sampled_from([math.nan, math.inf, -math.inf, 2.5, -1, 0, 10**30]))
    return wrong.filter(lambda v: not valid(rule, v))


FIELDS = [(cls, name) for cls in CONFIGS for name in rules_of(cls)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), _invalid(rules_of(f[0])[f[1]]))))
def test_every_config_refuses_one_invalid_value_naming_the_key(case) -> None:
    (cls, name), value = case
    with pytest.raises(ConfigError) as info:
        cls(**{name: value})
    assert name in str(info.value)
