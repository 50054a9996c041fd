"""run_train.sh as users run it: from their own directory, with bad environment variables, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_TRAIN = str(REPO / "run_train.sh")
TINY = ["--training.seq_len", "64", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false"]


def env(**extra: str) -> dict[str, str]:
    """This environment without the launcher's variables a developer may have set, plus `extra`."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("NGPU", "LOG_RANK", "SHUTDOWN_TIMEOUT", "NNODES", "RDZV_ENDPOINT", "RDZV_TIMEOUT")}
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def test_relative_paths_resolve_against_the_callers_directory(tmp_path: Path) -> None:
    """--config, training.dataset_path and job.dump_folder given relative to the working directory."""
    (tmp_path / "tiny").mkdir()
    for i in range(3):
        (tmp_path / "tiny" / f"doc{i}.txt").write_text(f"document {i} of a tiny corpus. " * 40)
    (tmp_path / "my.toml").write_text('[job]\ndump_folder = "./out"\n[training]\ndataset = "files"\nsteps = 2\n')
    r = subprocess.run([RUN_TRAIN, "--config", "./my.toml", "--training.dataset_path", "./tiny", *TINY],
                       cwd=tmp_path, env=env(NGPU="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the console: step of total, seconds per step and ETA; no colour codes in a redirected log
    assert re.search(r"step +2/2 +loss .* \d+\.\d\d s/step  ETA 0:00:00\n", r.stdout), r.stdout[-3000:]
    assert "\033[" not in r.stdout
    assert "('" not in r.stdout and "between blocks with tp" not in r.stdout  # start-up lines in words, tp 1
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]
    run = json.loads((tmp_path / "out" / "config.json").read_text())
    assert run["config"]["training"]["dataset_path"] == "./tiny"


def test_bare_config_name_is_found_in_the_repo(tmp_path: Path) -> None:
    r = subprocess.run([RUN_TRAIN, "--config", "llama3_8b.toml", "--job.dry_run"], cwd=tmp_path,
                       env=env(NGPU="8"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "8B" in r.stdout
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


@pytest.mark.parametrize("bad", [{"NGPU": "0"}, {"NGPU": "abc"}, {"NGPU": "2", "LOG_RANK": "2"},
                                 {"NGPU": "2", "LOG_RANK": "0;1"}, {"NGPU": "1", "SHUTDOWN_TIMEOUT": "5m"},
                                 {"NGPU": "1", "NNODES": "two"},
                                 {"NGPU": "1", "NNODES": "2", "RDZV_ENDPOINT": "head-node"}])
def test_bad_variable_is_one_line_and_exit_2(tmp_path: Path, bad: dict[str, str]) -> None:
    name = list(bad)[-1]
    r = subprocess.run([RUN_TRAIN, "--job.dump_folder", str(tmp_path / "d")], cwd=tmp_path, env=env(**bad),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout == "" and r.stderr.startswith(f"error: {name}={bad[name]}: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "d").exists()


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc; field 4 of stat is the parent pid)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(p.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            pass
    return found


def stop_with_sigterm(tmp_path: Path, to_a_worker: bool = False, sig: int = signal.SIGTERM, to_the_group: bool = False,
                      checkpoint: bool = True, **extra: str) -> tuple[int, str]:
    """Start a long run, signal run_train.sh (torchrun), one of its workers, or its whole process group
    (a terminal's Ctrl-C) once training has started; return (exit code, output)."""
    log = tmp_path / "log"
    args = [RUN_TRAIN, "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "100000", *TINY]
    if checkpoint:
        args += ["--checkpoint.enable", "--checkpoint.interval", "100000"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env(NGPU="2", **extra), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=to_the_group)
    try:
        deadline = time.time() + 240
        while not re.search(r"step +1[ /]", log.read_text()):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        if to_a_worker:  # as a cluster manager that signals the training processes themselves
            os.kill(_children(proc.pid)[-1], sig)
        elif to_the_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return proc.wait(timeout=120), log.read_text()
    finally:
        if proc.poll() is None:  # a hang: torchrun's own SIGTERM handling ends the workers too
            proc.terminate()
            proc.wait(timeout=60)


@pytest.mark.parametrize("to_a_worker", [False, True], ids=["to run_train.sh", "to one worker"])
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path: Path, to_a_worker: bool) -> None:
    code, out = stop_with_sigterm(tmp_path, to_a_worker)
    assert code == 143, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    saved = [p.name for p in (tmp_path / "run" / "checkpoint").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-"), saved
    assert f"SIGTERM: saved {saved[0]}" in out


def test_shutdown_timeout_is_the_workers_grace_period(tmp_path: Path) -> None:
    """With no grace at all torchrun kills the workers before they can save: the variable reaches it."""
    code, out = stop_with_sigterm(tmp_path, SHUTDOWN_TIMEOUT="0")
    assert code == 143, out[-3000:]
    assert "forcefully exiting" in out, out[-3000:]
    assert not list((tmp_path / "run" / "checkpoint").glob("step-*"))


@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpointing", "no checkpointing"])
def test_ctrl_c_saves_and_exits_130(tmp_path: Path, checkpoint: bool) -> None:
    """SIGINT to the launcher's process group, as a terminal's Ctrl-C sends it: with checkpointing the
    step finishes and is saved; without, one line; exit 130 either way, no traceback from any rank."""
    code, out = stop_with_sigterm(tmp_path, sig=signal.SIGINT, to_the_group=True, checkpoint=checkpoint,
                                  LOG_RANK="0,1")
    assert code == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    if checkpoint:
        saved = [p.name for p in (tmp_path / "run" / "checkpoint").iterdir()]
        assert len(saved) == 1 and saved[0].startswith("step-"), saved
        lines = [ln for ln in out.splitlines() if "Ctrl-C: saved" in ln]
        assert len(lines) == 1 and f"Ctrl-C: saved {saved[0]} in {tmp_path / 'run' / 'checkpoint'}" in lines[0], out
    else:
        assert not (tmp_path / "run" / "checkpoint").exists()
        lines = [ln for ln in out.splitlines() if "Ctrl-C: stopped during step" in ln]
        assert len(lines) == 1 and "nothing saved (checkpoint.enable is off)" in lines[0], out[-3000:]


def test_second_ctrl_c_aborts(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchtitan_sp import interrupt
    handler = interrupt.CtrlC()
    handler.defer = True  # checkpointing: the first asks for a stop after the step
    handler(signal.SIGINT, None)
    assert handler.requested
    handler(signal.SIGINT, None)  # torchrun passing the same key press on: ignored
    handler.last -= interrupt.REPEAT_S
    with pytest.raises(KeyboardInterrupt):  # a second key press
        handler(signal.SIGINT, None)
    plain = interrupt.CtrlC()  # no checkpointing: the first aborts
    with pytest.raises(KeyboardInterrupt):
        plain(signal.SIGINT, None)


def test_a_killed_worker_is_named_first(tmp_path: Path) -> None:
    """SIGKILL, as the out-of-memory killer sends it, to one worker: the summary names that rank and the
    signal first, not the other rank's broken connection."""
    code, out = stop_with_sigterm(tmp_path, to_a_worker=True, sig=signal.SIGKILL, checkpoint=False)
    assert code == 1, out[-3000:]
    lines = out[out.index("error: the run failed on"):].splitlines()
    assert re.fullmatch(r"  rank \d: killed by SIGKILL \(pid \d+\); it may have been the out-of-memory killer "
                        r"\(see dmesg or journalctl -k\)", lines[1]), out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_nan_loss_is_one_line_per_rank(tmp_path: Path) -> None:
    """A NaN loss on every rank: one line per rank with its step; tracebacks only in the error files."""
    r = subprocess.run([RUN_TRAIN, "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "3",
                        "--optimizer.lr", "1e30", *TINY], cwd=tmp_path, env=env(NGPU="2", LOG_RANK="0,1"),
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "no error file defined" not in out, out[-3000:]
    for rank in (0, 1):
        worker = [ln for ln in out.splitlines() if f"error: rank {rank}, step " in ln]
        assert len(worker) == 1 and "FloatingPointError: step " in worker[0] and "nan" in worker[0], out
        summary = [ln for ln in r.stderr.splitlines() if ln.startswith(f"  rank {rank}: exit code 1: ")]
        assert len(summary) == 1 and "FloatingPointError: step" in summary[0], r.stderr[-3000:]
        error_file = summary[0].rsplit("(traceback: ", 1)[1].rstrip(")")
        assert "Traceback" in json.loads(Path(error_file).read_text())["message"]["extraInfo"]["py_callstack"]
