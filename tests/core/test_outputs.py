"""The output policy (medanomaly.core.outputs) on tiny paths: where an output can go, inputs and
outputs kept apart, nothing replaced without overwrite, and one name per input for any set of inputs."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path, PurePath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.core import outputs
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import (
    check_new_file,
    check_out_path,
    check_separate,
    existing_outputs,
    refuse_existing,
    unique_stems,
)
from medanomaly.io import stem_of


def test_a_new_or_empty_folder_is_a_valid_output(tmp_path):
    check_out_path(tmp_path)
    check_out_path(tmp_path / "new" / "deeper")
    check_out_path(tmp_path / "new.onnx", "file")


@pytest.mark.parametrize(("make", "kind", "says"), [
    (lambda t: (t / "f").write_text("x") and t / "f", "folder", "is a file, not a folder"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "below", "folder", r"lies below .*f, which is a file"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "a" / "b.json", "file", "which is a file"),
    (lambda t: t, "file", "is a folder, not a regular file"),
    (lambda t: Path("/dev/null"), "file", "special files"),
    (lambda t: Path("/dev/null/x"), "folder", "special files"),
    (lambda t: Path("/proc/medanomaly-out"), "folder", "special files"),
    (lambda t: Path("/sys/x/y.json"), "file", "special files"),
])
def test_paths_that_cannot_be_outputs_are_refused(tmp_path, make, kind, says):
    with pytest.raises(MedanomalyError, match=says):
        check_out_path(make(tmp_path), kind)


def test_dev_shm_is_an_ordinary_folder():
    assert not outputs._special(Path("/dev/shm/out"))
    assert outputs._special(Path("/dev")) and outputs._special(Path("/proc/1/x"))


def test_an_unwritable_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_writable", lambda folder: folder != tmp_path)  # root writes anywhere
    with pytest.raises(MedanomalyError, match=f"the folder {tmp_path} is not writable"):
        check_out_path(tmp_path / "new" / "out")


def test_a_link_loop_is_refused(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(MedanomalyError, match="cannot be followed"):
        check_out_path(tmp_path / "a" / "out")


def test_outputs_and_inputs_are_kept_apart(tmp_path):
    data, img = tmp_path / "data", tmp_path / "single" / "x.png"
    (data / "case").mkdir(parents=True)
    img.parent.mkdir()
    img.write_bytes(b"")
    check_separate(tmp_path / "out", [data, img])
    check_separate(tmp_path / "data2", [data])  # a shared name prefix is not containment
    for out, says in ((data, "inside the input"), (data / "case" / "o", "inside the input"),
                      (img.parent / "o", "inside the input"), (tmp_path, "is inside --out")):
        with pytest.raises(MedanomalyError, match=says):
            check_separate(out, [data, img])
    check_separate(data / "o", [tmp_path / "missing"])  # a missing input is left to its reader


def test_a_link_into_the_input_is_inside_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(MedanomalyError, match="inside the input"):
        check_separate(tmp_path / "link" / "out", [tmp_path / "data"])


def test_existing_outputs_finds_every_file_of_a_stem(tmp_path):
    for name in ("a_pred.png", "A_SCORE.tif", "a_overlay.png", "ab_pred.png", "a_predx.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    found = existing_outputs([tmp_path / "a", tmp_path / "new" / "c"], ("_overlay.png", "_seg.dcm"),
                             ("_pred", "_score"))
    assert sorted(p.name for p in found) == ["A_SCORE.tif", "a_overlay.png", "a_pred.png"]
    (tmp_path / "sub").write_text("a file where the outputs of sub/x go")
    with pytest.raises(MedanomalyError, match="is a file, not a folder"):
        existing_outputs([tmp_path / "sub" / "x"], ("_overlay.png",))


def test_refuse_existing(tmp_path):
    refuse_existing([], False, tmp_path)
    (tmp_path / "a").write_text("")
    with pytest.raises(MedanomalyError, match=r"already holds 1 file\(s\) .*a\); pass --overwrite"):
        refuse_existing([tmp_path / "a"], False, tmp_path)
    refuse_existing([tmp_path / "a"], True, tmp_path)
    (tmp_path / "d").mkdir()
    with pytest.raises(MedanomalyError, match="holds the folder"):
        refuse_existing([tmp_path / "d"], True, tmp_path)


def test_check_new_file(tmp_path):
    check_new_file(tmp_path / "plan.json", False)
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(MedanomalyError, match="exists already; pass --overwrite"):
        check_new_file(tmp_path / "plan.json", False)
    check_new_file(tmp_path / "plan.json", True)


def test_unique_stems_keep_the_usual_names_and_resolve_collisions():
    entries = [(Path("dirA"), Path("dirA/T1.png")), (Path("dirB"), Path("dirB/T1.png")),
               (Path("d"), Path("d/x/a.png")), (Path("d"), Path("d/x/a.nii.gz")), (Path("e"), Path("e/u.png")),
               (Path("s"), Path("s/k/A.png")), (Path("s"), Path("s/k/a.png"))]
    assert [str(n) for n in unique_stems(entries, stem_of)] == [
        "dirA/T1", "dirB/T1", "d/x/a.png", "d/x/a.nii.gz", "u", "s/k/A.png~6", "s/k/a.png~7"]


_SEGMENT = st.sampled_from(["a", "A", "b", "T1", "t1", "x.y", "é", "e\u0301", "a~1"])
_SUFFIX = st.sampled_from([".png", ".PNG", ".tif", ".nii.gz", ".nii", ".dcm", ""])


@st.composite
def _inputs(draw) -> list[tuple[Path, Path]]:
    """Distinct image paths below a few folders, each with a root: the folder given on the command
    line (an ancestor of the file, or the file's own folder when the file itself is given)."""
    paths = draw(st.lists(st.tuples(st.lists(_SEGMENT, min_size=1, max_size=3), _SEGMENT, _SUFFIX),
                          min_size=1, max_size=12))
    entries, seen = [], set()
    for folders, name, suffix in paths:
        path = Path(*folders, name + suffix)
        if path in seen:
            continue
        seen.add(path)
        depth = draw(st.integers(0, len(folders)))
        entries.append((Path(*folders[: max(depth, 1)]) if depth else path.parent, path))
    return entries


def _key(name: PurePath) -> str:
    return unicodedata.normalize("NFC", str(name)).casefold()


@settings(max_examples=300, deadline=None)
@given(_inputs())
def test_unique_names_for_any_set_of_input_paths(entries):
    names = unique_stems(entries, stem_of)
    assert len({_key(n) for n in names}) == len(names) == len(entries)  # even where case is ignored
    assert names == unique_stems(entries, stem_of)  # deterministic
    assert all(not n.is_absolute() and ".." not in n.parts for n in names)  # always below --out
    usual = [PurePath(os.path.relpath(p, r)).parent / stem_of(p) for r, p in entries]
    keys = [_key(u) for u in usual]
    for name, own, key in zip(names, usual, keys):
        if keys.count(key) == 1:
            assert name == own  # a usual name that no other input has is never changed
