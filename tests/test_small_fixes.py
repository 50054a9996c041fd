"""Smaller first-hour fixes: --help names the launcher's variables and shows the recipe's defaults, a dry
run without NGPU says to set it, plot_metrics.py says what is wrong in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan_sp.config import help_text, load_config
from torchtitan_sp.rules import NGPU_DEFAULTED, load_and_validate

REPO = Path(__file__).resolve().parent.parent
PLOT = str(REPO / "scripts" / "plot_metrics.py")


def test_help_shows_the_recipes_defaults_and_the_launcher_variables() -> None:
    text = help_text()
    assert "--training.steps (int, default 30)" in text  # debug_model.toml's, not the built-in 20
    assert "--job.dump_folder (str, default './outputs/debug')" in text
    for name in ("NGPU:", "LOG_RANK:", "SHUTDOWN_TIMEOUT:", "PYTHON:"):
        assert f"\n  {name} " in text
    assert "--training.steps (int, default 1000)" in help_text(load_config(["--config", "llama3_8b.toml"]))


def test_world_size_error_says_to_set_ngpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(NGPU_DEFAULTED, "1")
    with pytest.raises(SystemExit) as e:
        load_and_validate(["--config", "llama8b_cp4.toml", "--job.dry_run"], world_size=4)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "but the world size is 4; NGPU was not set, so run_train.sh took 4" in err
    assert "set NGPU to the world size the degrees need" in err


def test_plot_metrics_errors_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, PLOT, str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'nope'}: no such file or folder (give a run's " \
                                             "dump folder or its metrics.jsonl)\n", r.stderr
    without = "import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = ['plot_metrics.py']; " \
              f"runpy.run_path({PLOT!r}, run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == ('error: plot_metrics.py needs matplotlib, an optional extra: '
                                              'pip install -e ".[plot]" (or pip install matplotlib)\n'), r.stderr


def test_cpu_launch_checks_host_memory(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The README's 8B example on 4 CPU processes of a 24 GiB machine stops before allocating."""
    from torchtitan_sp import host_memory
    from torchtitan_sp.validate import main
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 24 * 2**30)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    argv = ["validate", "--config", "llama3_8b.toml", "--parallelism.data_parallel_shard_degree", "4",
            "--training.seq_len=16384"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert re.match(r"error: host memory: this run needs about [\d.]+ GiB per process x 4 processes = [\d.]+ GiB, "
                    r"but 24\.0 GiB are available; no seq_len fits this model.flavor; use fewer processes", err), err
    monkeypatch.setattr(sys, "argv", ["validate"])  # the debug recipe fits
    main()
