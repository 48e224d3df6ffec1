"""What the ``medanomaly`` command prints: lines on stdout, problems on stderr, flushed at once (the
commands run for minutes and under torchrun, where buffered output would arrive late and interleaved)."""

from __future__ import annotations

import sys


def say(text: str, err: bool = False) -> None:
    """Print ``text`` on stdout (``err``: stderr) and flush."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)
