"""Tests for medanomaly.core.version: one release number, the package's and pyproject.toml's."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

import medanomaly
from medanomaly.core.version import __version__

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_version_is_the_packages_and_the_projects() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert medanomaly.__version__ == __version__
    assert tomllib.loads(PYPROJECT.read_text())["project"]["version"] == __version__
