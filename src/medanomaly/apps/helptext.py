"""What ``medanomaly --help`` and ``medanomaly COMMAND --help`` show besides the flags: the examples
each command's help ends with, the global flags (given before or after the command) and the
help layout that keeps the examples one command per line."""

from __future__ import annotations

import argparse
from typing import Any

#: what ``medanomaly COMMAND --help`` ends with: one or two command lines that work as they stand
EXAMPLES = {
    "train": ["medanomaly train ../shared/data/lgg-flair --out runs/lgg --max-minutes 30",
              "medanomaly train ../shared/data/lgg-flair --out runs/lgg --resume   # continue an interrupted run"],
    "pretrain": ["medanomaly pretrain scans/ --out runs/pre --max-minutes 20",
                 "medanomaly train labelled/ --out runs/ft --init runs/pre"],
    "predict": ["medanomaly predict runs/lgg new-images/ --out predictions",
                "medanomaly predict runs/lgg dicom-series-folder/ --out predictions --no-dicom-seg"],
    "evaluate": ["medanomaly evaluate --model runs/lgg --data ../shared/data/lgg-flair --out eval",
                 "medanomaly evaluate --pred predictions --data ../shared/data/lgg-flair --out eval-pred"],
    "demo": ["medanomaly demo --out demo-out",
             "medanomaly demo --data ../shared/data/lgg-flair --out demo-lgg --max-minutes 10"],
    "export": ["medanomaly export runs/lgg",
               "medanomaly predict runs/lgg new-images/ --out predictions --runtime onnx"],
    "serve": ["medanomaly serve runs/lgg   # then open http://127.0.0.1:8000 in a browser"],
    "synthesize": ["medanomaly synthesize ../shared/data/lgg-flair --out synth --n 500",
                   "medanomaly train ../shared/data/lgg-flair --out runs/lgg-synth --extra synth --size 128"],
    "plan": ["medanomaly plan ../shared/data/lgg-flair --max-minutes 30 --out plan.json",
             "medanomaly train ../shared/data/lgg-flair --plan plan.json --out runs/lgg"],
    "calibrate": ["medanomaly calibrate runs/lgg --data ../shared/data/lgg-flair",
                  "medanomaly calibrate runs/lgg --data ../shared/data/lgg-flair --overwrite"],
}
QUIET_HELP = "warnings only, no progress lines (before or after the command)"
VERBOSE_HELP = ("medanomaly's debug lines too (before or after the command); other libraries stay at warnings, "
                "as their lines may quote patient identifiers")


class Formatter(argparse.HelpFormatter):
    """argparse's help layout, but an "examples:" epilog keeps its lines (one command per line)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def examples(lines: list[str]) -> str:
    """An epilog of example command lines."""
    return "examples:\n  " + "\n  ".join(lines)


def global_flags(p: argparse.ArgumentParser, here: bool) -> None:
    """-q/--quiet and -v/--verbose, on the main parser (``here``) and again on each command, where
    they default to nothing (SUPPRESS) so that one given before the command is not reset after it."""
    default: Any = False if here else argparse.SUPPRESS
    p.add_argument("-q", "--quiet", action="store_true", default=default, help=QUIET_HELP)
    p.add_argument("-v", "--verbose", action="store_true", default=default, help=VERBOSE_HELP)
