"""The issue's kill test: a tiny ``medanomaly train`` in a subprocess is SIGKILLed at each phase
(loading the data, training, calibration, writing model.json); the directory it leaves is refused
by ``predict``, ``evaluate`` and ``export`` with the command that completes it, and once completed
by that command it predicts exactly as the directory of an uninterrupted run (the same model.json,
weights hash included, and the same score maps and masks).

The phase is reached through a hook that only this test installs: the subprocess runs a small
script that wraps one function of medanomaly to print ``PAUSED <phase>`` and sleep at that point,
then runs the CLI; the test waits for that line and kills the process. The four subprocesses
start together (most of their time is importing torch); the completions run in-process, as the
uninterrupted run does (in one thread, the numbers are the same in and out of process)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medanomaly.apps.cli import main
from medanomaly.infer.predictor import Predictor
from medanomaly.io import read_image

FLAGS = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "2", "--batch-size", "4", "--precision", "fp32",
         "--no-plan", "--max-minutes", "0", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# the pause points: loading = the first image load of prepare; training = the end of the second epoch
# (the first one saved); calibration = the val predictions; writing = the os.replace of model.json
HOOK = r"""
import os, sys, time
phase, argv = sys.argv[1], sys.argv[2:]

def pause():
    print("PAUSED", phase, flush=True)
    time.sleep(600)

def wrap(module, name, when=lambda *a, **k: True):
    orig = getattr(module, name)
    def wrapped(*a, **k):
        if when(*a, **k):
            pause()
        return orig(*a, **k)
    setattr(module, name, wrapped)

if phase == "loading":
    import medanomaly.train.prepare as m
    wrap(m, "load_slices")
elif phase == "training":
    import medanomaly.train.loop as m
    calls = []
    wrap(m, "end_epoch", lambda *a, **k: calls.append(1) or len(calls) == 2)
elif phase == "calibration":
    import medanomaly.calibrate.search as m
    wrap(m, "val_predictions")
elif phase == "writing":
    wrap(os, "replace", lambda src, dst, *a, **k: str(dst).endswith("model.json"))
from medanomaly.apps.cli import main
sys.exit(main(argv))
"""


def _kill_all(argvs: dict[str, list[str]]) -> None:
    """``medanomaly -q train ARGV`` for each phase in a subprocess of its own, all started at once
    (their imports overlap), each SIGKILLed once it pauses at its phase."""
    procs = {phase: subprocess.Popen([sys.executable, "-c", HOOK, phase, "-q", "train", *argv], env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for phase, argv in argvs.items()}
    try:
        for phase, proc in procs.items():
            line = proc.stdout.readline()  # blocks until the hook pauses (or the process ends)
            assert line.strip() == f"PAUSED {phase}", f"no pause at {phase}: {line!r} {proc.stderr.read()}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def killed(phantoms, tmp_path_factory) -> dict[str, Path]:
    """{phase: the model directory a run killed at that phase left (absent: killed before creating it)}."""
    root = tmp_path_factory.mktemp("killed")
    _kill_all({phase: [str(phantoms), "--out", str(root / phase), *FLAGS] for phase in COMPLETION})
    return {phase: root / phase for phase in COMPLETION}


@pytest.fixture(scope="module")
def finished(phantoms, tmp_path_factory) -> Path:
    """The model directory of an uninterrupted run: what every completed one must equal."""
    out = tmp_path_factory.mktemp("finished") / "m"
    assert main(["-q", "train", str(phantoms), "--out", str(out), *FLAGS]) == 0  # in-process: same numbers
    return out


def _same_as_finished(model: Path, finished: Path, phantoms: Path) -> None:
    assert (model / "model.json").read_text() == (finished / "model.json").read_text()
    ours, theirs = Predictor(model), Predictor(finished)
    for image in sorted(phantoms.glob("synthetic_case_04/*_[0-9].png"))[:2]:
        img = read_image(image)
        np.testing.assert_array_equal(ours.scores(img), theirs.scores(img))
        np.testing.assert_array_equal(ours.predict(img).mask, theirs.predict(img).mask)


COMPLETION = {  # what the refusal must name, and the command that completes the directory
    "loading": ("medanomaly train", lambda data, m: ["train", data, "--out", m, *FLAGS]),
    "training": ("--resume", lambda data, m: ["train", data, "--out", m, "--resume", "--device", "cpu"]),
    "calibration": ("medanomaly calibrate", lambda data, m: ["calibrate", m, "--data", data, "--device", "cpu"]),
    "writing": ("medanomaly calibrate", lambda data, m: ["calibrate", m, "--data", data, "--device", "cpu"]),
}


@pytest.mark.parametrize("phase", list(COMPLETION))
def test_a_run_killed_at_each_phase_is_refused_then_completed(phase, phantoms, killed, finished, tmp_path, cli):
    model = tmp_path / "m"
    if killed[phase].exists():
        shutil.copytree(killed[phase], model)
    assert not (model / "model.json").exists()  # never a model file before calibration has succeeded
    if phase == "writing":  # killed inside the atomic write: only its temporary file exists
        assert [p.name.endswith(".json") for p in cli.tmp_files(model)] == [True]
    names, complete = COMPLETION[phase]
    image = min(phantoms.glob("synthetic_case_04/*_[0-9].png"))
    for command in ("predict", "evaluate", "export"):
        argv = {"predict": (model, image, "--out", tmp_path / "pred"), "export": (model, "--out", tmp_path / "m.onnx"),
                "evaluate": ("--model", model, "--data", phantoms, "--out", tmp_path / "eval")}[command]
        cli.refuses(command, *argv, says=names, untouched=(tmp_path, phantoms))
    if phase == "training":  # calibrating weights whose training has not ended is refused too
        cli.refuses("calibrate", model, "--data", phantoms, says="has not ended.*--resume", untouched=(tmp_path,))
    rc, err = cli(*complete(phantoms, model))
    assert rc == 0, err
    assert not cli.tmp_files(model)
    _same_as_finished(model, finished, phantoms)
