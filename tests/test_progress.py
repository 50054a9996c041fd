"""Console progress: step N/T, s/step and ETA on every metric line, a heartbeat while no step finishes,
colour only on a terminal."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from torchtitan_sp import progress
from torchtitan_sp.metrics import COLOR_ENV, MetricsLogger, use_color

M = {"loss": 2.5, "loss_max": 2.6, "grad_norm": 0.5, "lr": 1e-3, "tps": 1234.0, "tokens_seen": 10,
     "data_pct": 1.0, "s_per_step": 0.5}


def test_metric_line_has_step_of_total_seconds_per_step_and_eta(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, False, color=False, active=False, first_step=1, total_steps=30)
    line = logger._line(5, M)
    assert line.startswith("step     5/30  loss   2.5000")
    assert line.endswith("0.50 s/step  ETA 0:00:12")  # 25 steps left at 0.5 s
    assert "\033[" not in line
    assert "\033[" in MetricsLogger(tmp_path, False, color=True, active=False, first_step=1, total_steps=30)._line(5, M)
    assert progress.duration(3 * 3600 + 62) == "3:01:02"


def test_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(COLOR_ENV, raising=False)
    assert use_color(False, Terminal()) and not use_color(False, io.StringIO())
    assert not use_color(True, Terminal())  # metrics.disable_color_printing forces plain lines
    monkeypatch.setenv(COLOR_ENV, "0")  # run_train.sh: its stdout is not a terminal
    assert not use_color(False, Terminal())
    monkeypatch.setenv(COLOR_ENV, "1")
    assert use_color(False, io.StringIO()) and not use_color(True, io.StringIO())


def test_heartbeat_while_no_step_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.1)
    lines: list[str] = []
    beat = progress.Heartbeat(10, 0, lines.append)
    try:
        time.sleep(0.45)
        assert lines and lines[0] == "step 1/10 still running: 0:00:00 since training started", lines
        assert len(lines) <= 5  # one per interval, not one per check
        beat.step_done(1)
        n = len(lines)
        time.sleep(0.03)
        assert len(lines) == n  # a step just finished: quiet
        time.sleep(0.3)
        assert lines[-1] == "step 2/10 still running: 0:00:00 since the previous step finished", lines
    finally:
        beat.stop()
