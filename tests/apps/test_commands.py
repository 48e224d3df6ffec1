"""The command functions' glue: every parsed ``train`` flag reaches its config key, unset flags
leave the defaults alone, and every command of the parser has a function."""

from __future__ import annotations

import argparse

from medanomaly.apps.commands import COMMANDS, train_overrides
from medanomaly.apps.parser import build_parser
from medanomaly.config import schema as config

FLAGS = ["--size", "48", "--epochs", "3", "--max-minutes", "2.5", "--batch-size", "4", "--lr", "0.01", "--seed", "7",
         "--loss", "dice", "--optimizer", "sgd", "--width", "8", "--depth", "2", "--norm", "instance",
         "--encoder", "plain", "--dim", "3", "--patch", "16", "32", "32", "--spacing", "2", "1", "1",
         "--patches-per-epoch", "9", "--patience", "4", "--precision", "fp32", "--no-augment", "--compile",
         "--tta", "--task", "anomaly", "--method", "identity", "--noise-res", "8", "--noise-std", "0.1",
         "--target-fpr", "0.05", "--init", "weights.pt", "--freeze-encoder-epochs", "2", "--unlabelled", "more",
         "--unlabelled-method", "pretrain", "--pretrain-share", "0.5", "--synthetic-lesions", "0.25",
         "--extra", "gan/", "--plan", "plan.json"]


def _train_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "DATA", "--out", "MODEL", *flags])


def test_no_flags_keep_every_default():
    overrides = train_overrides(_train_args())
    assert set(overrides.values()) == {None}
    assert config.load(None, overrides) == config.TrainConfig()


def test_every_train_flag_reaches_its_config_key():
    cfg = config.load(None, train_overrides(_train_args(*FLAGS)))
    assert (cfg.size, cfg.epochs, cfg.max_minutes, cfg.batch_size, cfg.lr, cfg.seed) == (48, 3, 2.5, 4, 0.01, 7)
    assert (cfg.loss, cfg.optimizer, cfg.patience, cfg.precision, cfg.task) == ("dice", "sgd", 4, "fp32", "anomaly")
    assert (cfg.model.width, cfg.model.depth, cfg.model.norm, cfg.model.encoder, cfg.model.dim) == (
        8, 2, "instance", "plain", 3)
    assert cfg.patch == (16, 32, 32) and cfg.spacing == (2.0, 1.0, 1.0) and cfg.patches_per_epoch == 9
    assert cfg.augment.enabled is False and cfg.compile is True and cfg.tta is True
    assert (cfg.anomaly.method, cfg.anomaly.noise_res, cfg.anomaly.noise_std, cfg.anomaly.target_fpr) == (
        "identity", 8, 0.1, 0.05)
    assert (cfg.init, cfg.freeze_encoder_epochs, cfg.unlabelled, cfg.unlabelled_method) == (
        "weights.pt", 2, "more", "pretrain")
    assert (cfg.pretrain_share, cfg.synthetic_lesions, cfg.extra) == (0.5, 0.25, "gan")  # a folder as a plain str


def test_off_switches_reach_the_config():
    cfg = config.load(None, train_overrides(_train_args("--no-compile", "--no-tta")))
    assert cfg.compile is False and cfg.tta is False and cfg.augment.enabled is True


def test_every_command_has_a_function():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
