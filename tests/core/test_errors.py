"""Tests for medanomaly.core.errors: the one error type that reaches a user is an Exception carrying
its message, which the CLI prints (without a traceback) with exit code 2."""

from __future__ import annotations

import pytest

from medanomaly.apps.cli import main
from medanomaly.core.errors import MedanomalyError


def test_it_is_an_exception_carrying_its_message() -> None:
    err = MedanomalyError("scan.png is empty (0 bytes); re-copy or re-export the file")
    assert isinstance(err, Exception) and not isinstance(err, (ValueError, OSError))
    assert str(err) == "scan.png is empty (0 bytes); re-copy or re-export the file" and err.args == (str(err),)
    with pytest.raises(MedanomalyError, match="re-export") as info:
        raise err
    assert info.value is err


def test_the_cli_prints_its_message_and_exits_2(tmp_path, capsys) -> None:
    assert main(["-q", "train", str(tmp_path / "absent"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "absent") in " ".join(err.split()) and "Traceback" not in err
