"""Tests for medanomaly.apps.console: lines on stdout, problems on stderr, each flushed at once."""

from __future__ import annotations

import io

import pytest

from medanomaly.apps import console


class Stream(io.StringIO):
    """A text stream that counts its flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_say_prints_a_line_on_stdout_or_stderr(capsys) -> None:
    console.say("trained 3 epochs")
    console.say("cannot read scan.png", err=True)
    out, err = capsys.readouterr()
    assert out == "trained 3 epochs\n" and err == "cannot read scan.png\n"


def test_say_flushes_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = Stream(), Stream()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    console.say("a")
    assert (out.getvalue(), out.flushes, err.flushes) == ("a\n", 1, 0)
    console.say("b", err=True)
    assert (err.getvalue(), err.flushes, out.flushes) == ("b\n", 1, 1)
