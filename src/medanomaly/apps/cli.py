"""The ``medanomaly`` command: train, predict, evaluate, demo, export, serve, synthesize, plan.

The arguments are in :mod:`medanomaly.apps.parser`, what each command does in
:mod:`medanomaly.apps.commands`. Every user error ends as one paragraph on stderr and exit code 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import textwrap

from medanomaly.apps.console import say
from medanomaly.apps.parser import (
    build_parser,  # also imported from here by callers that inspect the CLI
)
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import console_logging

PARALLEL = ("train", "predict")  # the commands that run data parallel under torchrun


def _torchrun() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them, (0, 1) outside torchrun (read without importing torch)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)
    except ValueError:
        return 0, 1


def _run(command: str, args: argparse.Namespace) -> int:
    # Imported here, once the arguments parse: the commands import torch and every stage. Measured on
    # the 2-core dev machine, `medanomaly --help` takes 0.2 s this way and 3-4 s with this import at the
    # top (0.3 s vs 6-9 s when the machine is busy); argument errors answer as fast as --help.
    from medanomaly.apps.commands import COMMANDS

    return COMMANDS[command](args)


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    """The parser, built once per process (7 ms each time otherwise): parsing does not change it."""
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv); returns the exit code: 0, 1 (predict: a file
    failed), 2 (user error: a flag that breaks its rule is argparse's usage error, before any work),
    130 (interrupted)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.quiet and args.verbose:
        say("medanomaly: error: -q/--quiet and -v/--verbose contradict each other; give one of them", err=True)
        return 2
    rank, world = _torchrun()
    args.quiet = args.quiet or rank != 0  # under torchrun the other processes log warnings only, no progress bars
    args.verbose = args.verbose and not args.quiet
    with console_logging(quiet=args.quiet, verbose=args.verbose, rank=rank):
        return _guarded(args, world)


def _guarded(args: argparse.Namespace, world: int) -> int:
    """Run the command; a user error is one paragraph on stderr and exit code 2."""
    try:
        if world > 1 and args.command not in PARALLEL:
            raise MedanomalyError(f"'{args.command}' runs in one process: under torchrun only 'train' and 'predict' "
                                  "are data parallel; run it without torchrun")
        return _run(args.command, args)
    except MedanomalyError as exc:
        say("error: " + textwrap.fill(str(exc), width=100, subsequent_indent="  ",
                                      break_long_words=False, break_on_hyphens=False), err=True)
        return 2
    except PermissionError as exc:
        say(f"error: permission denied: {exc.filename}; check the file's permissions or choose another path", err=True)
        return 2
    except KeyboardInterrupt:
        say("interrupted; 'medanomaly train --resume' continues a training run from its last epoch", err=True)
        return 130

if __name__ == "__main__":
    sys.exit(main())
