"""The trainer end to end: FSDP2 parity with one process, AC and compile, run_train.sh, TensorBoard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.dist_utils import free_port, run_distributed
from tests.trainer_utils import read_metrics, tiny_args, train
from torchtitan_sp.config import load_config
from torchtitan_sp.data.sources import SCAN_BYTES
from torchtitan_sp.parallelize.fsdp import reshard_after_forward

REPO = Path(__file__).resolve().parent.parent


def losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics]


def assert_close(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), (a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """One process, global batch 4 (what every parallel run below also trains on)."""
    dump = tmp_path_factory.mktemp("ref")
    return run_distributed(train, 1, tiny_args(dump, "--training.local_batch_size", "4"))[0]


def test_single_process_learns(reference):
    assert len(reference) == 5
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.2
    for key in ("step", "loss", "grad_norm", "lr", "tps", "loss_max", "tokens_seen"):
        assert key in reference[0]
    assert reference[-1]["tokens_seen"] == 5 * 4 * 64


def test_logged_lr_is_the_schedule_each_step_used(reference, tmp_path):
    """Step 1 runs at lr / (warmup + 1), the last step at lr x min_lr_factor (linear decay between),
    and each logged lr is the one its step used, not the next step's."""
    cfg = load_config(tiny_args(tmp_path))
    peak, warmup, floor = cfg.optimizer.lr, cfg.lr_scheduler.warmup_steps, cfg.lr_scheduler.min_lr_factor
    assert cfg.lr_scheduler.decay_type == "linear" and warmup == 2 and floor > 0
    logged = [m["lr"] for m in reference]
    decay = [floor + (1 - floor) * (1 - k / 3) for k in (1, 2, 3)]  # 3 decay steps, the last at the floor
    expected = [peak * f for f in [1 / 3, 2 / 3, *decay]]
    assert logged == pytest.approx(expected, rel=1e-9), (logged, expected)


@pytest.mark.parametrize("world, extra", [
    (2, ["--training.local_batch_size", "2"]),
    (4, ["--training.local_batch_size", "1"]),
    (4, ["--training.local_batch_size", "1", "--parallelism.data_parallel_replicate_degree", "2"]),  # HSDP
    (2, ["--training.local_batch_size", "1", "--training.global_batch_size", "4"]),  # grad accumulation
    (2, ["--training.local_batch_size", "2", "--parallelism.fsdp_reshard_after_forward", "never"]),
])
def test_fsdp_matches_single_process(tmp_path, reference, world, extra):
    metrics = run_distributed(train, world, tiny_args(tmp_path, *extra))[0]
    assert_close(losses(metrics), losses(reference), 1e-5)
    assert_close([m["grad_norm"] for m in metrics], [m["grad_norm"] for m in reference], 1e-4)
    assert metrics[-1]["tokens_seen"] == reference[-1]["tokens_seen"]


def test_fused_adamw_clips_like_clip_then_step(tmp_path):
    """The fused kernel clips through grad_scale: FSDP dp2 with it trains as one process with
    foreach AdamW after clip_grads_with_norm_. The clipping acts: max_norm is below every step's
    gradient norm (~0.7), and eps is large enough that Adam does not undo a uniform gradient scale."""
    def run(name: str, world: int, *extra: str) -> list[float]:
        args = tiny_args(tmp_path / name, "--training.local_batch_size", str(4 // world),
                         "--optimizer.eps", "1e-5", *extra)
        return losses(run_distributed(train, world, args)[0])

    ref = run("foreach", 1, "--training.max_norm", "0.05", "--optimizer.implementation", "foreach")
    fused = run("fused", 2, "--training.max_norm", "0.05")
    unclipped = run("unclipped", 2, "--training.max_norm", "0")
    assert_close(fused, ref, 1e-5)
    assert abs(fused[-1] - unclipped[-1]) > 1e-2


def test_reshard_after_forward_policy():
    """One rank per FSDP shard group: nothing to free but the 16-bit copy, so default keeps blocks
    unsharded to backward (the single-process runs above); more ranks reshard (the dp runs)."""
    assert [reshard_after_forward("default", n) for n in (1, 2)] == [False, True]
    assert [reshard_after_forward("always", n) for n in (1, 2)] == [True, True]
    assert [reshard_after_forward("never", n) for n in (1, 2)] == [False, False]


def test_activation_checkpointing_identical(tmp_path, reference):
    for mode in (["full"], ["selective", "--activation_checkpoint.selective_ac_option", "op"],
                 ["selective", "--activation_checkpoint.selective_ac_option", "1"]):
        m = run_distributed(train, 1, tiny_args(tmp_path / mode[-1], "--training.local_batch_size", "4",
                                                 "--activation_checkpoint.mode", *mode))[0]
        assert_close(losses(m), losses(reference), 1e-6)


def test_compile_close(tmp_path, reference):
    m = run_distributed(train, 1, tiny_args(tmp_path, "--training.local_batch_size", "4",
                                            "--compile.enable", "true", "--training.steps", "3"))[0]
    assert_close(losses(m), losses(reference)[:3], 1e-4)


def test_run_train_sh_end_to_end_and_tensorboard(tmp_path):
    dump = tmp_path / "run"
    env = {**os.environ, "NGPU": "2"}
    r = subprocess.run(["./run_train.sh", "--job.dump_folder", str(dump), "--training.steps", "12",
                        "--metrics.log_freq", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step    12" in r.stdout and "estimated peak memory per rank" in r.stdout
    metrics = read_metrics(dump)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert all(m["tps"] > 0 and m["grad_norm"] > 0 for m in metrics)
    run = json.loads((dump / "config.json").read_text())  # the resolved config, overrides included
    assert run["config"]["training"]["steps"] == 12 and run["config"]["metrics"]["log_freq"] == 2
    assert run["world_size"] == 2 and run["mesh"]["dp_shard"] == 2 and "FSDP2 2" in run["applied"]

    # The real TensorBoard server over this run's folder, read back through its HTTP data API.
    port = free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(dump), "--host", "127.0.0.1",
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = urllib.parse.quote(f"tb/{next((dump / 'tb').iterdir()).name}", safe="")  # tb/<start time>
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={run}&tag=loss"
        deadline, data = time.time() + 60, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    data = json.loads(resp.read())
                if len(data) == len(metrics):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert data is not None, "TensorBoard did not answer"
        assert [int(step) for _, step, _ in data] == [m["step"] for m in metrics]
        for (_, _, value), m in zip(data, metrics):
            assert abs(value - m["loss"]) < 1e-4
    finally:
        tb.terminate()
        tb.wait(timeout=30)

    # A later run in this folder that fails at its first step (a bad record found while streaming: the
    # corpus is larger than the start-up scan reads; exit 2, one line) leaves this run's metrics.jsonl,
    # TensorBoard events and config.json as they were.
    before = {p: p.read_bytes() for p in dump.rglob("*") if p.is_file()}
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n' * 3 + '{"title": "no text"}\n' + json.dumps({"text": "x" * SCAN_BYTES}) + "\n")
    r = subprocess.run([sys.executable, "-m", "torchtitan_sp.train", "--job.dump_folder", str(dump),
                        "--training.dataset", "files", "--training.dataset_path", str(data)],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and 'bad.jsonl line 4: no "text" field' in r.stderr, r.stdout + r.stderr
    assert "documents not counted" in r.stdout  # the trainer had started: the data loader found it
    assert {p: p.read_bytes() for p in dump.rglob("*") if p.is_file()} == before


def test_run_train_sh_on_default_corpus(tmp_path):
    """30 steps on the embedded corpus (this interpreter's standard library, packed documents)."""
    dump = tmp_path / "stdlib"
    r = subprocess.run(["./run_train.sh", "--job.dump_folder", str(dump), "--training.dataset", "stdlib",
                        "--training.steps", "30", "--metrics.log_freq", "5", "--metrics.enable_tensorboard", "false"],
                       cwd=REPO, env={**os.environ, "NGPU": "2"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = read_metrics(dump)
    assert len(metrics) == 6
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, [m["loss"] for m in metrics]
