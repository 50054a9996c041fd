"""Several nodes, on loopback: two run_train.sh launchers of 2 processes each (NNODES=2, c10d rendezvous)
train exactly as 4 processes on one node; a node that never arrives ends the run within RDZV_TIMEOUT
with one line. All launchers run at once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--training.steps", "4", "--training.seq_len", "64", "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard", "false"]


def _launch(tmp: Path, name: str, dump: str, **variables: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NGPU", "LOG_RANK", "NNODES", "RDZV_ENDPOINT")}
    env.update(OMP_NUM_THREADS="1", **variables)
    out = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([str(REPO / "run_train.sh"), *ARGS, "--job.dump_folder", str(tmp / dump)], cwd=tmp,
                            env=env, stdout=out, stderr=subprocess.STDOUT)


def _records(dump: Path) -> list[dict]:
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_equal_one_and_a_missing_node_times_out(tmp_path: Path) -> None:
    two = {"NGPU": "2", "NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_TIMEOUT": "120"}
    lonely = {"NGPU": "2", "NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_TIMEOUT": "3"}
    procs = {"node-a": _launch(tmp_path, "node-a", "two", **two), "node-b": _launch(tmp_path, "node-b", "two", **two),
             "single": _launch(tmp_path, "single", "single", NGPU="4"),
             "lonely": _launch(tmp_path, "lonely", "lonely", **lonely)}
    start = time.time()
    try:
        codes = {name: p.wait(timeout=300) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    assert codes == {"node-a": 0, "node-b": 0, "single": 0, "lonely": 1}, {k: v[-2000:] for k, v in logs.items()}

    two_nodes, one_node = _records(tmp_path / "two"), _records(tmp_path / "single")
    assert [r["step"] for r in two_nodes] == [1, 2, 3, 4]
    for a, b in zip(two_nodes, one_node):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]) and a["tokens_seen"] == b["tokens_seen"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * abs(b["grad_norm"])

    lonely_lines = [ln for ln in logs["lonely"].splitlines() if ln.startswith("error:")]
    assert lonely_lines == [f"error: not every node arrived at the rendezvous {lonely['RDZV_ENDPOINT']} within "
                            f"RDZV_TIMEOUT=3 s: run the same command with NNODES=2 and RDZV_ENDPOINT="
                            f"{lonely['RDZV_ENDPOINT']} on each of the 2 nodes"], logs["lonely"][-3000:]
    assert "Traceback" not in logs["lonely"]
    assert time.time() - start < 300
