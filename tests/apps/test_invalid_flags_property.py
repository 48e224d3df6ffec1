"""Property tests (hypothesis): every subcommand refuses every invalid flag value, and ``train``
every invalid config value, with exit code 2, no traceback, and nothing started.

One invalid value per example, on otherwise valid arguments pointing at tiny existing inputs:
wrong types, out of range, NaN and infinities, unknown options, empty strings, huge numbers. The
invalid values are built from each flag's declared rule (medanomaly.config.rules) or choices, by
category, so a flag or key added without a rule is caught by tests/apps/test_parser.py and one whose
rule is not enforced is caught here. The functions that do the work (training, planning, predicting,
serving...) are replaced by a tripwire: validation must refuse the value before any of them runs,
and no output folder may appear.

``MEDANOMALY_PROPERTY_EXAMPLES`` sets the examples per test (default 2000, as issue 15 asks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medanomaly.apps import api, commands, serve
from medanomaly.apps.parser import Checked, build_parser
from medanomaly.config.rules import Rule, rules_of
from medanomaly.config.schema import SECTION_CLASSES, TrainConfig, rule_of
from medanomaly.evaluate import score
from medanomaly.train import plan as planning

EXAMPLES = int(os.environ.get("MEDANOMALY_PROPERTY_EXAMPLES", "2000"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])
SUB = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
COMMANDS = sorted(SUB.choices)

#: every TrainConfig key with a rule, dotted for the sections
CONFIG_KEYS = sorted([k for k, r in rules_of(TrainConfig).items() if r.kind != "section"]
                     + [f"{s}.{k}" for s, cls in SECTION_CLASSES.items() for k in rules_of(cls)] + list(SECTION_CLASSES))
SPLIT_NAMES = ("train", "val", "test", "all")  # those of world's splits.json, and all
#: the commands whose work the no_work fixture replaces (a new command joins them)
TRIPWIRED = ("calibrate", "demo", "evaluate", "export", "plan", "predict", "pretrain", "serve", "synthesize", "train")


class Started(AssertionError):
    """Work began although a value was invalid."""


def _tripwire(*args, **kwargs):
    raise Started("work started: an invalid value was not refused first")


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every function that does a command's work raises Started."""
    for name in ("train", "predict_paths", "export_onnx", "synthesize", "run_demo", "discover", "calibrate"):
        monkeypatch.setattr(commands, name, _tripwire, raising=False)  # calibrate: part 2 of issue 15
    for name in ("_train_run", "predict_paths", "calibrate_model", "calibrate_and_save", "discover"):
        # the commands are a thin layer over the API (issue 14); evaluate checks its split first: score.Predictor
        monkeypatch.setattr(api, name, _tripwire)
    for name in ("for_run", "fingerprint", "make_plan", "machine"):
        monkeypatch.setattr(planning, name, _tripwire)
    monkeypatch.setattr(score, "Predictor", _tripwire)
    monkeypatch.setattr(serve, "run", _tripwire)


@pytest.fixture
def world(tmp_path: Path, labelled_phantoms, make_model_dir) -> dict[str, Path]:
    data = labelled_phantoms(tmp_path / "data")
    return {"data": data, "model": make_model_dir(tmp_path / "model"), "inputs": data / "case0" / "case0_0.png",
            "pred": data, "out": tmp_path / "outs" / "out", "n": "2", "config": tmp_path / "cfg.json"}


# --- invalid command-line texts, from a flag's rule or choices ---------------------------------------------

def _parses(text: str, kind: str) -> bool:
    try:
        (int if kind == "int" else float)(text)
        return True
    except ValueError:
        return False


def _in_bounds(rule: Rule, value: float) -> bool:
    return ((rule.ge is None or value >= rule.ge) and (rule.gt is None or value > rule.gt)
            and (rule.le is None or value <= rule.le) and (rule.lt is None or value < rule.lt))


def _out_of_range(rule: Rule) -> list[st.SearchStrategy]:
    """Numbers just and far outside the rule's bounds (huge ones above an upper bound)."""
    lows, highs = [b for b in (rule.ge, rule.gt) if b is not None], [b for b in (rule.le, rule.lt) if b is not None]
    if rule.kind == "int":
        found = [st.integers(max_value=int(b)) for b in lows] + [st.integers(min_value=int(b)) for b in highs]
        found += [st.integers(min_value=10**18, max_value=10**60)] if highs else []
    else:
        found = ([st.floats(max_value=b, allow_nan=False, allow_infinity=False) for b in lows]
                 + [st.floats(min_value=b, allow_nan=False, allow_infinity=False) for b in highs]
                 + ([st.floats(min_value=1e300, max_value=1.7e308)] if highs else []))
    return [s.filter(lambda v: not _in_bounds(rule, v)) for s in found]  # -0.0 >= 0: the bound itself may be valid


def bad_texts(rule: Rule) -> st.SearchStrategy[str]:
    """Texts that are not a valid value of a flag with a scalar ``rule``."""
    if rule.kind == "str":
        pattern = rule.pattern or r"[\s\S]+"  # as medanomaly.config.rules matches: the whole text, no flags
        spoilers = [c for c in "\x00 /\n:-\t" if re.fullmatch(pattern, f"a{c}a") is None]  # what the pattern refuses
        spoilt = st.tuples(st.text(max_size=8), st.sampled_from(spoilers), st.text(max_size=8)).map("".join)
        return st.one_of(st.just(""), spoilt).filter(lambda t: re.fullmatch(pattern, t) is None)
    specials = ["", "nan", "NaN", "inf", "-inf", "true", "fast", "1,5", " "] + (["2.5", "1e3", "0x10"]
                                                                                  if rule.kind == "int" else [])
    numbers = st.one_of(*_out_of_range(rule)).map(repr) if _out_of_range(rule) else st.nothing()
    words = st.text().filter(lambda t: not _parses(t, rule.kind))
    if rule.kind == "int":
        words = st.one_of(words, st.floats().filter(lambda f: not f.is_integer() if math.isfinite(f) else True)
                          .map(repr))
    return st.one_of(st.sampled_from(specials), numbers, words).filter(lambda t: not _accepted(rule, t))


def _accepted(rule: Rule, text: str) -> bool:
    """What a careful user would call valid: the text is a number of the right kind within the bounds."""
    if not _parses(text, rule.kind):
        return False
    value = (int if rule.kind == "int" else float)(text)
    return (not isinstance(value, float) or math.isfinite(value)) and _in_bounds(rule, value)


def _bad_for(action: argparse.Action) -> st.SearchStrategy[str]:
    if isinstance(action.type, Checked):
        bad = bad_texts(action.type.rule)
        if action.dest == "split":  # any other name reaches the split file, read before anything is predicted
            bad = st.one_of(bad, st.text(min_size=1).filter(lambda t: "\x00" not in t and t not in SPLIT_NAMES))
        return bad
    names = {str(c) for c in action.choices}
    if action.type is int:  # argparse converts, then compares: ' 2' is 2
        return st.text().filter(lambda t: not (_parses(t, "int") and int(t) in action.choices))
    return st.text().filter(lambda t: t not in names)


def _value_actions(command: str) -> list[argparse.Action]:
    return [a for a in SUB.choices[command]._actions if a.nargs != 0 and a.dest != "help"]


def _base(command: str, world: dict) -> list[str]:
    """Valid arguments: the positionals and required options from ``world``, and --out where it exists."""
    parser = SUB.choices[command]
    first = {g._group_actions[0].dest for g in parser._mutually_exclusive_groups if g.required}
    argv = [str(world[a.dest]) for a in parser._actions if not a.option_strings and a.dest != "help"]
    for a in parser._actions:
        if a.option_strings and (a.required or a.dest in first or a.dest == "out"):
            argv += [a.option_strings[0], str(world[a.dest])]
    return argv


def _with(command: str, base: list[str], action: argparse.Action, bad: str, index: int) -> list[str]:
    """``base`` with ``bad`` as the value of ``action`` (one element of a nargs=3 flag)."""
    if not action.option_strings:  # a positional: replace its value
        pos = [a.dest for a in SUB.choices[command]._actions if not a.option_strings and a.dest != "help"]
        return [*base[: pos.index(action.dest)], bad, *base[pos.index(action.dest) + 1:]]
    if isinstance(action.nargs, int) and action.nargs > 1:
        values = ["16"] * action.nargs
        values[index % action.nargs] = bad
        return [*base, action.option_strings[0], *values]
    return [*base, f"{action.option_strings[-1]}={bad}"]


def _check_refused(cli, world: dict, argv: list[str], key: str | None = None) -> None:
    rc, err = cli(*argv)
    assert rc == 2, f"{argv}: exit {rc}: {err}"
    assert "Traceback" not in err, err
    assert not world["out"].exists(), f"{argv} created {world['out']}"
    assert key is None or cli.says(err, re.escape(key)), f"{key} not named: {err}"


def test_every_command_is_driven_here() -> None:
    assert set(COMMANDS) == set(TRIPWIRED)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_invalid_flag_value_is_refused_before_any_work(command: str, cli, world, no_work) -> None:
    actions, base = _value_actions(command), _base(command, world)
    with pytest.raises(Started):  # the base arguments are valid: they reach the work
        cli(command, *base)
    assert not world["out"].exists()

    cases = st.one_of([st.tuples(st.just(a), _bad_for(a), st.integers(0, 2)) for a in actions])  # built once

    @SETTINGS
    @given(cases)
    def run(case: tuple[argparse.Action, str, int]) -> None:
        action, bad, index = case
        _check_refused(cli, world, [command, *_with(command, base, action, bad, index)])

    run()


# --- invalid config values (typed JSON), from each key's rule ----------------------------------------------

def bad_values(rule: Rule) -> st.SearchStrategy:
    """JSON values that break ``rule``: other types, out of range, NaN/inf, unknown options, empty
    strings or ones with a NUL, lists of the wrong length or order."""
    others = {"int": st.one_of(st.floats(allow_nan=False), st.booleans(), st.text()),
              "float": st.one_of(st.booleans(), st.text()),
              "bool": st.one_of(st.integers(), st.floats(allow_nan=False), st.text()),
              "str": st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False)),
              "section": st.one_of(st.integers(), st.booleans(), st.text())}[rule.kind]
    parts = [others] + ([] if rule.nullable else [st.none()])
    parts += [] if rule.length else [st.lists(st.integers(), max_size=2)]
    parts += [] if rule.kind == "section" else [st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)]
    if rule.kind == "float":
        parts.append(st.sampled_from([math.nan, math.inf, -math.inf] if rule.finite else [math.nan]))
    if rule.kind in ("int", "float") and not rule.choices:
        parts += _out_of_range(rule)
    if rule.kind == "int" and rule.choices:
        parts.append(st.integers().filter(lambda v: v not in rule.choices))
    if rule.kind == "str":
        parts += [st.just(""), st.text().map(lambda t: t + "\x00")]
        parts += [st.text().filter(lambda t: t not in rule.choices)] if rule.choices else []
    if not rule.length:
        return st.one_of(parts)
    good = 1 if rule.kind == "int" else 1.0
    return st.one_of(st.lists(st.just(good), max_size=6).filter(lambda v: len(v) != rule.length),  # wrong length
                     st.integers(0, rule.length - 1).flatmap(lambda i: st.one_of(parts).map(  # one bad element
                         lambda bad: [good] * i + [bad] + [good] * (rule.length - i - 1))),
                     st.one_of(parts).filter(lambda v: v is not None and not isinstance(v, list)),  # not a list
                     *([st.just([2.0, 1.0])] if rule.ordered else []))  # (low, high) reversed


def _file_content(key: str, value: object) -> dict:
    section, _, name = key.rpartition(".")
    return {section: {name: value}} if section else {key: value}


def test_every_invalid_config_value_is_refused_before_any_work(cli, world, no_work) -> None:
    argv = ["train", str(world["data"]), "--out", str(world["out"]), "--config", str(world["config"])]

    cases = st.one_of([st.tuples(st.just(k), bad_values(rule_of(k))) for k in CONFIG_KEYS])  # built once

    @SETTINGS
    @given(cases)
    def run(case: tuple[str, object]) -> None:
        key, value = case
        world["config"].write_text(json.dumps(_file_content(key, value)))
        _check_refused(cli, world, argv, key)

    run()
