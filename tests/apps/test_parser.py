"""The CLI's arguments against the one source of options and defaults: every ``choices`` is the
tuple of medanomaly.config.options, every "(default X)" in a help text is the config's value, the
settings the planner sets say "chosen by the plan", and building the parser imports no torch."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from medanomaly.apps.parser import PLANNED, TRAIN_KEYS, Checked, build_parser
from medanomaly.config import options
from medanomaly.config.rules import item_rule, rules_of
from medanomaly.config.schema import DEMO_MAX_MINUTES, TrainConfig, rule_of
from medanomaly.config.sections import GanConfig
from medanomaly.train.plan import DataFingerprint, MachineInfo, make_plan

CFG, GAN = TrainConfig(), GanConfig()

#: (command, dest) -> the option list its choices must be
CHOICES = {
    ("train", "loss"): options.LOSSES, ("train", "optimizer"): options.OPTIMIZERS, ("train", "norm"): options.NORMS,
    ("train", "encoder"): options.ENCODERS, ("train", "dim"): options.DIMS, ("train", "precision"): options.PRECISIONS,
    ("train", "task"): options.TASKS, ("train", "method"): options.ANOMALY_METHODS,
    ("train", "unlabelled_method"): options.UNLABELLED_METHODS, ("pretrain", "encoder"): options.ENCODERS,
    ("predict", "runtime"): options.RUNTIMES, ("predict", "naming"): options.NAMINGS,
    ("export", "format"): options.EXPORT_FORMATS,
    ("plan", "task"): options.TASKS,
}

#: (command, dest) -> the config value its help quotes as "(default X)"
DEFAULTS = {
    ("train", "max_minutes"): CFG.max_minutes, ("train", "lr"): CFG.lr, ("train", "seed"): CFG.seed,
    ("train", "loss"): CFG.loss, ("train", "optimizer"): CFG.optimizer, ("train", "encoder"): CFG.model.encoder,
    ("train", "dim"): CFG.model.dim, ("train", "patches_per_epoch"): CFG.patches_per_epoch,
    ("train", "patience"): CFG.patience, ("train", "precision"): CFG.precision, ("train", "task"): CFG.task,
    ("train", "method"): CFG.anomaly.method, ("train", "noise_res"): CFG.anomaly.noise_res,
    ("train", "noise_std"): CFG.anomaly.noise_std, ("train", "target_fpr"): CFG.anomaly.target_fpr,
    ("train", "freeze_encoder_epochs"): CFG.freeze_encoder_epochs,
    ("train", "unlabelled_method"): CFG.unlabelled_method, ("train", "pretrain_share"): CFG.pretrain_share,
    ("pretrain", "size"): CFG.size, ("pretrain", "epochs"): CFG.epochs, ("pretrain", "max_minutes"): CFG.max_minutes,
    ("pretrain", "batch_size"): CFG.batch_size, ("pretrain", "width"): CFG.model.width,
    ("pretrain", "depth"): CFG.model.depth, ("pretrain", "encoder"): CFG.model.encoder, ("pretrain", "seed"): CFG.seed,
    ("demo", "max_minutes"): DEMO_MAX_MINUTES, ("demo", "seed"): CFG.seed,
    ("synthesize", "size"): GAN.size, ("synthesize", "max_minutes"): GAN.minutes,
    ("synthesize", "max_steps"): GAN.max_steps, ("synthesize", "batch_size"): GAN.batch_size,
    ("synthesize", "width"): GAN.width, ("synthesize", "seed"): GAN.seed, ("plan", "max_minutes"): CFG.max_minutes,
}

#: train arguments that are not TrainConfig keys
NOT_CONFIG = {"help", "data", "out", "config", "splits", "resume", "device", "plan", "no_plan", "quiet", "verbose"}


def _actions() -> list[tuple[str, argparse.Action]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, a) for name, p in sub.choices.items() for a in p._actions]


def _help(command: str, dest: str) -> str:
    return next(a.help for c, a in _actions() if c == command and a.dest == dest)


def _same(quoted: str, value: object) -> bool:
    return quoted == value if isinstance(value, str) else float(quoted) == pytest.approx(float(value))


def test_every_choices_list_is_the_option_tuple():
    found = {(c, a.dest): tuple(a.choices) for c, a in _actions() if a.choices and a.dest != "help"}
    assert found == CHOICES


def test_every_quoted_default_is_the_configs():
    quoted = {(c, a.dest): m.group(1) for c, a in _actions() if a.help
              for m in [re.search(r"\(default ([^\s):;,]+)", a.help)] if m}
    assert set(quoted) == set(DEFAULTS)  # a new "(default X)" belongs in DEFAULTS, checked against the config
    wrong = {k: (quoted[k], DEFAULTS[k]) for k in quoted if not _same(quoted[k], DEFAULTS[k])}
    assert wrong == {}
    assert f"{CFG.max_minutes:g} for --data" in _help("demo", "max_minutes")  # demo with real data: train's budget
    assert options.DEFAULT_UNLABELLED_METHOD in _help("train", "unlabelled_method")  # what auto means


def test_argparse_defaults_are_the_configs():
    args = build_parser().parse_args(["plan", "DATA"])
    assert args.max_minutes == CFG.max_minutes
    assert build_parser().parse_args(["demo"]).seed == CFG.seed


def test_what_the_plan_sets_says_chosen_by_the_plan():
    fp = DataFingerprint("d", 10, 100, 100, 100, 80, 80, 10, 100, False, (128, 128), None, 1, ("raster",), True,
                         {"p0.5": 0, "p50": 5, "p99.5": 154, "mean": 21, "std": 31}, 0.3, 0.01, 0.4, True)
    speed = lambda size, width, batch: 30.0  # injected: the plan's keys are tested, not its measurement
    planned = set(make_plan(fp, MachineInfo(cores=2, memory_gib=16.0, bf16=True), speed=speed).to_config_overrides())
    # the plan takes the run's own task and budget (config defaults unless given): those help texts quote them
    planned -= {"task", "max_minutes"}
    by_key = {key: dest for dest, key in TRAIN_KEYS.items()}
    flags = {by_key[k] for k in planned if k in by_key}
    assert flags == {"size", "epochs", "batch_size", "width", "depth", "norm"}
    for c, a in _actions():
        if c == "train" and a.help:
            assert (PLANNED in a.help) == (a.dest in flags), a.dest


def test_every_train_flag_is_a_config_key():
    dests = {a.dest for c, a in _actions() if c == "train"}
    assert dests - NOT_CONFIG == set(TRAIN_KEYS)
    for key in TRAIN_KEYS.values():  # each key exists in TrainConfig (or its sections)
        section, _, name = key.rpartition(".")
        assert hasattr(getattr(CFG, section) if section else CFG, name), key


def test_building_the_parser_imports_no_torch():
    code = "import sys; from medanomaly.apps.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # --help and argument errors answer without the 2-3 s torch import


def test_every_flag_that_takes_a_value_is_checked_as_it_is_parsed():
    """A rule (config.rules, via parser.Checked) or a choices list for each: nothing reaches a command
    unchecked (tests/apps/test_invalid_flags_property.py drives them with invalid values)."""
    unchecked = [(c, a.dest) for c, a in _actions()
                 if a.nargs != 0 and a.dest != "help" and not isinstance(a.type, Checked) and not a.choices]
    assert unchecked == []


def test_config_flags_check_their_keys_rules():
    for c, a in _actions():
        if c == "train" and a.dest in TRAIN_KEYS and a.dest != "extra" and isinstance(a.type, Checked):  # a Path
            assert a.type.rule == item_rule(rule_of(TRAIN_KEYS[a.dest])), a.dest
    by_dest = {(c, a.dest): a.type for c, a in _actions()}
    assert by_dest[("synthesize", "max_minutes")].rule == rules_of(GanConfig)["minutes"]
    assert by_dest[("serve", "port")]("0") == 0 and by_dest[("serve", "port")]("65535") == 65535
    for text in ("cpu", "cuda", "cuda:1", "auto", "mps"):
        assert by_dest[("train", "device")](text) == text


def test_a_bad_value_is_argparse_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "DATA", "--out", "M", "--lr", "nan"])
    assert info.value.code == 2
    assert "argument --lr: must be a number in (0, 10] (got nan)" in capsys.readouterr().err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_every_command_has_help_and_every_command_examples():
    no_help = [(c, a.option_strings or a.dest) for c, a in _actions() if not (a.help and a.help.strip())]
    assert no_help == []
    for name, p in _subparsers().items():
        text = p.format_help()
        examples = text.split("examples:\n", 1)[1].splitlines() if "examples:\n" in text else []
        assert examples and all(line.strip().startswith("medanomaly ") for line in examples), (name, text[-300:])
        assert any(line.strip().startswith(f"medanomaly {name} ") for line in examples), name
        assert text.rstrip().endswith(examples[-1].rstrip())  # the help ends with them


def test_examples_parse():
    """Each example command line is one the parser accepts (comments after '#' aside)."""
    for p in _subparsers().values():
        for line in p.epilog.splitlines()[1:]:
            argv = line.split("#")[0].split()[1:]
            assert build_parser().parse_args(argv).command == argv[0], line


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "plan", "D"], True, False), (["plan", "D", "-q"], True, False), (["plan", "D", "--quiet"], True, False),
    (["-v", "plan", "D"], False, True), (["plan", "-v", "D"], False, True), (["plan", "D"], False, False),
    (["-q", "train", "D", "--out", "M"], True, False), (["train", "D", "--out", "M", "--verbose"], False, True)])
def test_global_flags_work_before_and_after_the_command(argv, quiet, verbose):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_quiet_and_verbose_together_are_refused(capsys):
    from medanomaly.apps.cli import main

    assert main(["-q", "plan", "D", "-v"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_planned_settings_and_real_defaults_are_what_help_says():
    train = _subparsers()["train"].format_help()
    assert "--size SIZE" in train and "(default 128)" not in train.split("--epochs")[0].split("--size SIZE")[1]
    for flag in ("--device", "--tensorboard"):
        assert flag in train
    assert "(default: auto)" in _subparsers()["predict"].format_help()
