"""Tests for medanomaly.core.atomic: a write goes to a temporary file beside the target (same suffix)
and replaces the target only once it is complete; a failing write leaves the old file and no
temporary file behind."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.core.atomic import atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_text


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_temporary_file_is_beside_the_target_with_its_suffix(tmp_path: Path) -> None:
    target = tmp_path / "new" / "sub" / "mask.nii.gz"  # missing folders are made
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tmp-mask") and tmp.name.endswith(".nii.gz")
        assert tmp.exists() and not target.exists()  # nothing at the target until the block ends
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and not tmp.exists()
    assert _leftovers(target.parent) == []


def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "model.json"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text("half writ")
            1 / 0
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_an_interrupt_is_cleaned_up_too(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):  # BaseException: Ctrl-C during a checkpoint write
        with atomic_path(tmp_path / "checkpoint.pt"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_text_bytes_and_torch_writers(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode("utf-8")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "replaced")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" and (tmp_path / "t.txt").read_text() == "replaced"
    state = {"w": torch.arange(3.0)}
    atomic_torch_save(state, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], state["w"])
    assert _leftovers(tmp_path) == []


def test_a_failing_torch_save_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    atomic_torch_save({"epoch": 1}, tmp_path / "c.pt")
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: None}, tmp_path / "c.pt")  # a lambda cannot be pickled
    assert torch.load(tmp_path / "c.pt", weights_only=True) == {"epoch": 1} and _leftovers(tmp_path) == []


@settings(max_examples=20, deadline=None)
@given(first=st.binary(max_size=64), second=st.binary(max_size=64))
def test_property_the_target_holds_the_last_complete_write(first: bytes, second: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "f.bin"
        atomic_write_bytes(target, first)
        atomic_write_bytes(target, second)
        assert target.read_bytes() == second and os.listdir(tmp) == ["f.bin"]
