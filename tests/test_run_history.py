"""Runs in the same dump folder keep their history: a fresh run renames the previous metrics.jsonl to a
dated name (and says so) and writes TensorBoard events to a subfolder of tb/ named for its start; a
resumed run appends to both."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from torchtitan_sp.metrics import MetricsLogger

M = {"loss": 2.5, "loss_max": 2.6, "grad_norm": 0.5, "lr": 1e-3, "tps": 1.0, "tokens_seen": 10, "data_pct": 1.0}


def _run(folder: Path, first_step: int, steps: int) -> None:
    logger = MetricsLogger(folder, True, color=False, active=True, first_step=first_step, total_steps=10)
    for step in range(first_step, first_step + steps):
        logger.log(step, M)
    logger.close()


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_fresh_runs_keep_earlier_history(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _run(tmp_path, 1, 3)  # first run
    _run(tmp_path, 4, 2)  # resumed at step 4: appends
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
    first_tb = list((tmp_path / "tb").iterdir())
    assert len(first_tb) == 1 and re.fullmatch(r"\d{8}-\d{6}", first_tb[0].name)
    assert len(list(first_tb[0].glob("events.out.tfevents.*"))) == 2  # the resumed run wrote there too

    _run(tmp_path, 1, 2)  # a fresh run in the same folder
    kept = sorted(tmp_path.glob("metrics-*.jsonl"))
    assert len(kept) == 1 and re.fullmatch(r"metrics-\d{8}-\d{6}\.jsonl", kept[0].name)
    assert _steps(kept[0]) == [1, 2, 3, 4, 5] and _steps(tmp_path / "metrics.jsonl") == [1, 2]
    assert f"the previous run's metrics.jsonl in {tmp_path} is kept as {kept[0].name}" in caplog.text
    runs = sorted((tmp_path / "tb").iterdir())
    assert len(runs) == 2 and runs[0] == first_tb[0]  # a new subfolder beside the first
    _run(tmp_path, 1, 1)  # and another, within the same second: nothing overwritten
    assert len(list(tmp_path.glob("metrics-*.jsonl"))) == 2 and len(list((tmp_path / "tb").iterdir())) == 3
