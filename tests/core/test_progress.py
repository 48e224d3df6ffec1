"""Progress on a terminal as a bar, elsewhere as a few log lines; logging set up per command (libraries
at WARNING whatever the verbosity); train.log written once a run has started, appended on resume."""

from __future__ import annotations

import io
import logging
import sys
import time

import pytest

from medanomaly.core import progress as P


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clock(monkeypatch, step: float) -> None:
    """time.monotonic advancing ``step`` seconds per call (a slow loop without waiting)."""
    now = [0.0]

    def tick() -> float:
        now[0] += step
        return now[0]
    monkeypatch.setattr(P.time, "monotonic", tick)


def test_not_a_terminal_gives_a_few_log_lines_not_redraws(monkeypatch, caplog):
    _clock(monkeypatch, 1.0)  # 1 s per item: 100 items take 100 s
    with caplog.at_level(logging.INFO, logger="medanomaly.progress"):
        assert list(P.track(range(100), desc="loading", unit="img")) == list(range(100))
    lines = [r.getMessage() for r in caplog.records]
    assert 5 <= len(lines) <= 11, lines  # at each tenth (>= 5 s apart) plus the end, not one per item
    assert lines[0].startswith("loading: 10/100 (10 %) img") and "img/s" in lines[0]
    assert lines[-1].startswith("loading: done 100/100 (100 %)")


def test_a_long_loop_without_total_logs_every_30_s(monkeypatch, caplog):
    _clock(monkeypatch, 10.0)
    with caplog.at_level(logging.INFO, logger="medanomaly.progress"):
        bar = P.track(iter(range(9)), desc="epoch 1", unit="batch")
        for _ in bar:
            bar.set_postfix(loss="0.5")
    lines = [r.getMessage() for r in caplog.records]
    assert 3 <= len(lines) <= 4 and all("loss=0.5" in line for line in lines), lines


def test_short_loops_log_nothing_and_disabled_shows_nothing(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="medanomaly.progress"):
        assert sum(P.track(range(50), desc="quick")) == sum(range(50))
        bar = P.track(total=3, desc="GAN", enabled=False)
        bar.update(3)
        bar.close()
    assert caplog.records == [] and capsys.readouterr().err == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    bar = P.track(range(3), desc="loading", unit="img")
    assert type(bar).__name__ == "tqdm" and list(bar) == [0, 1, 2]
    assert "loading" in sys.stderr.getvalue()


def test_console_logging_keeps_libraries_at_warning_and_restores_levels():
    lib = logging.getLogger("highdicom.seg")
    before = {n: logging.getLogger(n).level for n in ("", "medanomaly", "highdicom")}
    with P.console_logging(verbose=True):
        assert logging.getLogger("medanomaly").isEnabledFor(logging.DEBUG)
        assert not lib.isEnabledFor(logging.INFO) and lib.isEnabledFor(logging.WARNING)
    with P.console_logging(quiet=True):
        assert logging.getLogger("medanomaly.train").isEnabledFor(logging.INFO)  # for train.log
    assert {n: logging.getLogger(n).level for n in before} == before


def test_run_log_waits_for_the_run_to_start_and_appends(tmp_path):
    log = logging.getLogger("medanomaly.test_progress")
    log.setLevel(logging.INFO)
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier run's: not this run's start
    with P.run_log(out / "train.log", started=out / "config.json"):
        log.info("refused before it started")
    assert not (out / "train.log").exists()
    with P.run_log(out / "train.log", started=out / "config.json"):
        log.info("loading 1")
        time.sleep(0.01)
        (out / ".tmp").write_text("{}")
        (out / ".tmp").replace(out / "config.json")  # as an atomic write
        log.info("epoch 0")
        log.debug("not at INFO")
    with P.run_log(out / "train.log", started=out / "config.json"):
        log.info("resumed")
        (out / ".tmp").write_text("{}")
        (out / ".tmp").replace(out / "config.json")
    text = (out / "train.log").read_text()
    assert [line.split(": ", 1)[1] for line in text.splitlines()] == ["loading 1", "epoch 0", "resumed"]
    assert "refused" not in text


def test_run_logged_takes_the_out_argument_and_rank(tmp_path):
    @P.run_logged("out", started="config.json")
    def run(data: str, out, flag: bool = False) -> str:
        out.mkdir()
        (out / "config.json").write_text("{}")
        logging.getLogger("medanomaly").warning("from the run")
        return data

    assert run("d", out=tmp_path / "a") == "d"
    assert "from the run" in (tmp_path / "a" / "train.log").read_text()
    quiet = P.run_logged("out", enabled=lambda: False)(run.__wrapped__)
    quiet("d", tmp_path / "b")
    assert not (tmp_path / "b" / "train.log").exists()


@pytest.mark.parametrize("stream", [None, io.StringIO()])
def test_no_stream_or_a_plain_one_is_no_terminal(stream):
    assert not P._terminal(stream)
