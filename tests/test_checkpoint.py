"""Checkpointing and fault tolerance on the real trainer.

Every rank is a `python -m torchtitan_sp.train` process over gloo, started here directly (the
environment torchrun would set, without its agent): a test can then signal or kill one rank and
watch what the others do on their own. Losses come from <dump_folder>/metrics.jsonl.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import free_port
from tests.trainer_utils import read_metrics
from torchtitan_sp.config import Optimizer
from torchtitan_sp.optim import build_optimizer, restore_hyperparameters

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 5  # comm.train_timeout_seconds of these runs

# Global batch 4 on any mesh (gradient accumulation makes up the rest), so runs on different
# meshes see the same samples per step. lr warmup over 8 steps and no decay: the schedule does
# not depend on training.steps, so a run of 5 steps is the first half of a run of 10.
COMMON = ["--training.seq_len", "64", "--training.local_batch_size", "1", "--training.global_batch_size", "4",
          "--training.steps", "10", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
          "--metrics.disable_color_printing", "--lr_scheduler.warmup_steps", "8", "--lr_scheduler.decay_type", "none",
          "--lr_scheduler.min_lr_factor", "0",  # no decay: the recipe's floor would be ignored (an error)
          "--comm.train_timeout_seconds", str(TIMEOUT)]
# Checkpointing, unless a run's own arguments switch it off (its keys would then be meaningless: an error).
CHECKPOINTS = ["--checkpoint.enable", "--checkpoint.interval", "5", "--comm.checkpoint_timeout_seconds", str(TIMEOUT)]
NO_CHECKPOINTS = ("--checkpoint.enable", "false")


class Run:
    """One training job: a process per rank, output in <dump>/rank<R>.log."""

    def __init__(self, dump: Path, nproc: int, args: tuple[str, ...]):
        self.dump = dump
        dump.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.procs = []
        off = any(args[i:i + 2] == NO_CHECKPOINTS for i in range(len(args)))
        common = COMMON + ([] if off else CHECKPOINTS)
        for r in range(nproc):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1"}
            with open(dump / f"rank{r}.log", "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "torchtitan_sp.train", *common, "--job.dump_folder", str(dump), *args],
                    env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 120) -> list[int | None]:
        """Exit codes; None for a rank still running at the deadline (then killed)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        codes = [p.poll() for p in self.procs]
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        return codes

    def log(self, rank: int = 0) -> str:
        return (self.dump / f"rank{rank}.log").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- rank {r}\n{self.log(r)[-3000:]}" for r in range(len(self.procs)))


def train(dump: Path, nproc: int, *args: str) -> Run:
    """Run to completion; every rank must exit 0."""
    run = Run(dump, nproc, args)
    codes = run.wait()
    assert codes == [0] * nproc, f"exit codes {codes}\n{run.logs()}"
    return run


def losses(dump: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in records}


def assert_close(got: dict[int, float], want: dict[int, float], steps: range, rtol: float) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= rtol * abs(want[s]), f"step {s}: {got[s]} vs {want[s]}\n{got}\n{want}"


def checkpoints(dump: Path) -> list[str]:
    return sorted(p.name for p in (dump / "checkpoint").iterdir())


def copy_checkpoints(src: Path, dst: Path, *names: str) -> None:
    for name in names:
        shutil.copytree(src / "checkpoint" / name, dst / "checkpoint" / name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 uninterrupted steps on 2 ranks (dp2), checkpoints at 5 and 10, weights exported."""
    dump = tmp_path_factory.mktemp("reference")
    train(dump, 2, "--checkpoint.export_final")
    assert checkpoints(dump) == ["model.pt", "step-10", "step-5"]
    return dump


def test_resume_matches_uninterrupted_run(reference: Path, tmp_path: Path) -> None:
    # Stop after 5 steps (saved asynchronously), then resume to 10 in the same folder.
    train(tmp_path, 2, "--training.steps", "5", "--checkpoint.async_mode", "async")
    assert checkpoints(tmp_path) == ["step-5"]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a line torn by a crash mid-write
    run = train(tmp_path, 2, "--checkpoint.keep_latest_k", "1")
    assert "resumed from" in run.log() and "at step 5" in run.log()
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 11))  # appended after the first run's records
    assert_close(got, losses(reference), range(1, 11), 1e-6)  # model, optimizer, lr, data order
    assert checkpoints(tmp_path) == ["step-10"]  # keep_latest_k
    # every logged field but the timings: tokens_seen restored, the lr schedule and the max at its step
    logged = {d: {r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
              for d in (tmp_path, reference)}
    for step in range(1, 11):
        got, want = logged[tmp_path][step], logged[reference][step]
        assert got["tokens_seen"] == want["tokens_seen"], step
        for key in ("loss", "loss_max", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (step, key)


def test_text_stream_continues_on_another_dp_degree(tmp_path: Path) -> None:
    """Real text saved by dp2, resumed by one process: it reads both old ranks' data states and
    continues after the furthest document they used (tests/test_data.py checks no repeats)."""
    text = ("--training.dataset", "stdlib", "--training.steps", "4", "--checkpoint.interval", "2")
    train(tmp_path, 2, *text)
    run = train(tmp_path, 1, *text, "--training.steps", "6", "--checkpoint.load_step", "4")
    assert "resumed from" in run.log() and "at step 4" in run.log()
    assert "data-parallel degree changed 2 -> 1: the text stream continues at document" in run.log(), run.log()
    assert sorted(losses(tmp_path)) == list(range(1, 7))


def test_tensorboard_shows_each_step_once_after_resume(tmp_path: Path) -> None:
    # The first run logged steps 6-10 past checkpoint step-5; resuming there logs them again.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = ("--metrics.enable_tensorboard", "true")
    train(tmp_path, 1, *tb)
    train(tmp_path, 1, *tb, "--checkpoint.load_step", "5")
    runs = list((tmp_path / "tb").iterdir())
    assert len(runs) == 1  # the resumed run appended to the fresh run's folder
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 11))
    assert sorted(losses(tmp_path)) == list(range(1, 11))


def test_resume_on_other_meshes(reference: Path, tmp_path: Path) -> None:
    # Saved by 4 ranks as dp2 x cp2; resumed by dp4 (ranks 1-3 continue the sample stream at an
    # offset) and by a single process.
    saved = tmp_path / "dp2cp2"
    train(saved, 4, "--parallelism.context_parallel_degree", "2")
    want = losses(saved)
    assert_close(want, losses(reference), range(1, 11), 1e-5)  # the mesh does not change training
    for name, nproc, args in (("dp4", 4, ()), ("single", 1, ("--checkpoint.load_step", "5"))):
        dump = tmp_path / name
        # The single process also has step-10 and must take step-5 because load_step says so.
        copy_checkpoints(saved, dump, "step-5", *(("step-10",) if name == "single" else ()))
        run = train(dump, nproc, *args)
        assert f"data-parallel degree changed 2 -> {nproc}" in run.log()
        got = losses(dump)
        assert sorted(got) == list(range(6, 11))
        assert_close(got, want, range(6, 11), 1e-5)


def test_resumed_run_follows_its_own_lr_keys(reference: Path, tmp_path: Path) -> None:
    """Resumed at step 5 with another peak lr, warmup, decay and length: steps 6-8 run on the new
    schedule (the saved optimizer's lr does not come back) and the last one at the new floor."""
    copy_checkpoints(reference, tmp_path, "step-5")
    train(tmp_path, 1, "--training.steps", "8", "--optimizer.lr", "0.004", "--lr_scheduler.warmup_steps", "2",
          "--lr_scheduler.decay_type", "linear", "--lr_scheduler.min_lr_factor", "0.5")
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path)}
    decayed = [0.004 * (0.5 + 0.5 * (1 - k / 6)) for k in (4, 5, 6)]  # 6 decay steps after 2 of warmup
    assert [lr[s] for s in (6, 7, 8)] == pytest.approx(decayed, rel=1e-9), lr
    # Started again at its end: says so and leaves the records alone.
    before = (tmp_path / "metrics.jsonl").read_bytes()
    run = train(tmp_path, 1, "--training.steps", "8")
    assert "resumed at step 8 >= training.steps 8: nothing to train" in run.log()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_optimizer_keys_win_over_the_loaded_state() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    saved = build_optimizer([w], Optimizer(lr=0.1, weight_decay=0.2, beta1=0.8, eps=1e-6))
    w.grad = torch.ones(3)
    saved.step()
    keys = Optimizer(lr=0.01, weight_decay=0.0)
    resumed = build_optimizer([w], keys)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["weight_decay"] == 0.2  # what loading alone brings back
    restore_hyperparameters(resumed, keys)
    group = resumed.param_groups[0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"], group["betas"], group["eps"]) == \
        (0.01, 0.01, 0.0, (keys.beta1, keys.beta2), keys.eps)
    assert resumed.state[w]["step"] == 1 and resumed.state[w]["exp_avg"].abs().sum() > 0  # moments kept


@pytest.mark.parametrize("args, message", [
    (("--checkpoint.load_step", "7"), "error: checkpoint.load_step 7: no complete checkpoint step-7 in "
                                      ".*checkpoint \\(complete ones: \\[5, 10\\]\\)"),
    # DCP alone would load the first block's weights of a two-block checkpoint and say nothing.
    (("--model.n_layers", "1"), "error: checkpoint.load_step: .*step-10 holds another model than model.flavor "
                                "'debug' \\(model.n_layers 1\\): layers.1.attention.wq.weight is \\[128, 128\\] "
                                "there, absent here"),
    (("--checkpoint.enable", "false", "--checkpoint.initial_load_path", "{tmp}"),
     "error: checkpoint.initial_load_path: .* is not a DCP checkpoint folder \\(no .metadata\\)"),
])
def test_bad_checkpoint_is_one_line_before_training(reference: Path, tmp_path: Path, args: tuple, message: str) -> None:
    shutil.copy(reference / "metrics.jsonl", tmp_path / "metrics.jsonl")  # an earlier run's records
    args = tuple(a.format(tmp=tmp_path) for a in args)
    folder = () if args[:2] == NO_CHECKPOINTS else ("--checkpoint.folder", str(reference / "checkpoint"))
    run = Run(tmp_path, 1, (*folder, *args))
    assert run.wait() == [2]
    assert re.fullmatch(message, run.log().strip()), run.log()
    assert (tmp_path / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def test_initial_weights_from_dcp_or_export(reference: Path, tmp_path: Path) -> None:
    first = {}
    for name, path in (("dcp", "step-10"), ("export", "model.pt")):
        dump = tmp_path / name
        run = train(dump, 2 if name == "dcp" else 1, "--training.steps", "1", "--checkpoint.enable", "false",
                    "--checkpoint.initial_load_path", str(reference / "checkpoint" / path))
        assert "initialized the model from" in run.log()
        first[name] = losses(dump)[1]
    # Same weights either way (the trained ones: step 1's loss is far below a fresh model's).
    assert abs(first["dcp"] - first["export"]) <= 1e-5 * first["dcp"]
    assert first["dcp"] < losses(reference)[1] - 0.3


def test_kill_during_save_resumes_from_last_complete(reference: Path, tmp_path: Path) -> None:
    """SIGKILL one rank while a checkpoint is being written (every step saves; the kill lands a
    random moment after a save's folder appears): the survivor fails within the collective
    timeout, the partial save stays invisible and the rerun resumes from the last complete one."""
    ckpt = tmp_path / "checkpoint"
    args = ("--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2")
    run = Run(tmp_path, 2, args)
    victim = random.randrange(2)
    while run.procs[0].poll() is None:
        partial = [p for p in ckpt.glob("step-*.tmp") if int(p.name[5:-4]) >= 4]
        if partial:
            time.sleep(random.uniform(0, 0.01))
            run.procs[victim].send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    killed = time.monotonic()
    codes = run.wait(timeout=TIMEOUT + 30)
    assert codes[victim] == -signal.SIGKILL, f"the run ended before the kill\n{run.logs()}"
    assert codes[1 - victim] not in (0, None), run.logs()
    assert time.monotonic() - killed < TIMEOUT + 10, "the surviving rank did not give up within the timeout"
    assert list(ckpt.glob("step-*.tmp")), "the kill missed the save: nothing partial to skip"
    # Complete: renamed, or written with its .metadata but killed before the rename (then published).
    complete = [int(p.name[5:].removesuffix(".tmp")) for p in ckpt.glob("step-*") if (p / ".metadata").is_file()]
    assert complete, "no complete checkpoint before the kill"
    newest = max(complete)

    run = train(tmp_path, 2, *args)
    assert f"resumed from {ckpt / f'step-{newest}'} at step {newest}" in run.log(), run.log()
    assert not list(ckpt.glob("*.tmp"))
    assert checkpoints(tmp_path) == ["step-10", "step-9"]
    assert_close(losses(tmp_path), losses(reference), range(newest + 1, 11), 1e-6)


def test_save_stopped_before_its_rename_is_published(reference: Path, tmp_path: Path) -> None:
    """step-10.tmp with DCP's .metadata: complete, the run stopped before renaming it; resume
    publishes and uses it. step-12.tmp without .metadata: unfinished, removed."""
    copy_checkpoints(reference, tmp_path, "step-5")
    shutil.copytree(reference / "checkpoint" / "step-10", tmp_path / "checkpoint" / "step-10.tmp")
    (tmp_path / "checkpoint" / "step-12.tmp").mkdir()
    run = train(tmp_path, 1, "--checkpoint.load_step", "10")
    assert "publishing" in run.log() and "removing incomplete checkpoint" in run.log(), run.log()
    assert "at step 10" in run.log() and checkpoints(tmp_path) == ["step-10", "step-5"]


def test_hung_rank_fails_the_others_within_the_timeout(tmp_path: Path) -> None:
    """A rank that stops answering (SIGSTOP: no closed connection to notice) after the first
    step: the other rank's collectives time out after comm.train_timeout_seconds."""
    run = Run(tmp_path, 2, ("--training.steps", "100000", "--checkpoint.enable", "false"))
    try:
        while "step     3" not in run.log() and run.procs[0].poll() is None:
            time.sleep(0.05)
        run.procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        code = run.procs[0].wait(timeout=TIMEOUT + 30)
        assert code != 0, run.log()
        assert time.monotonic() - stopped < TIMEOUT + 10
        assert "Timed out" in run.log(), run.log()[-3000:]
    finally:
        run.wait(timeout=0)


def _timeouts_after_the_first_step(rank: int, world: int) -> dict[str, float]:
    from torchtitan_sp.attention.usp import USPAttention
    from torchtitan_sp.config import load_config
    from torchtitan_sp.parallel_dims import ParallelDims
    from torchtitan_sp.train import set_collective_timeout
    cfg = load_config(["--parallelism.context_parallel_degree", "4"])
    meshes = ParallelDims.from_config(cfg, world).build_mesh("cpu")
    usp = USPAttention(meshes["cp"], ulysses_degree=2, load_balance=True)  # ring 2 x ulysses 2: groups of its own
    saves = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))  # as CheckpointManager's
    set_collective_timeout(TIMEOUT, keep=(saves,))
    groups = {"ring": usp.ring_group, "ulysses": usp.exchange.group, "cp": meshes["cp"].get_group(), "saves": saves}
    return {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for name, g in groups.items()}


def test_collective_timeout_reaches_every_group() -> None:
    """The groups a strategy creates for itself (usp's ring and Ulysses groups, created with torch's
    30-minute default) get comm.train_timeout_seconds too, not only the mesh's."""
    from tests.dist_utils import run_distributed
    assert run_distributed(_timeouts_after_the_first_step, 4)[0] == {"ring": TIMEOUT, "ulysses": TIMEOUT, "cp": TIMEOUT,
                                                                     "saves": 60}


def test_sigterm_saves_then_exits(tmp_path: Path) -> None:
    """SIGTERM to one rank only: all ranks save the same step, exit 143, and a rerun resumes there."""
    run = Run(tmp_path, 2, ("--training.steps", "100000", "--checkpoint.interval", "100000"))
    while "step     2" not in run.log() and run.procs[0].poll() is None:
        time.sleep(0.05)
    run.procs[1].send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == [143, 143], run.logs()
    saved = checkpoints(tmp_path)
    assert len(saved) == 1 and saved[0].startswith("step-"), saved
    step = int(saved[0][5:])
    assert max(losses(tmp_path)) == step and "SIGTERM: saved step-" in run.log()

    train(tmp_path, 2, "--training.steps", str(step + 2))
    assert sorted(losses(tmp_path)) == list(range(1, step + 3))


@pytest.mark.parametrize("skip, implementation", [(False, "fused"), (True, "fused"), (True, "foreach")])
def test_nonfinite_loss(tmp_path: Path, skip: bool, implementation: str) -> None:
    # A huge learning rate: weights blow up after step 1 and step 2's gradients overflow.
    args = ("--training.steps", "4", "--optimizer.lr", "1e30", "--checkpoint.enable", "false",
            "--training.skip_nonfinite_loss", str(skip).lower(), "--optimizer.implementation", implementation)
    run = Run(tmp_path, 1, args)
    code = run.wait()[0]
    if skip:
        assert code == 0, run.log()
        metrics = read_metrics(tmp_path)
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        assert "step 2: loss is" in run.log() and "skipping the optimizer step" in run.log()
        # Skipped for real (fused: inside the kernel, found_inf): NaN gradients never reached the weights.
        assert all(math.isfinite(m["loss"]) for m in metrics) and math.isnan(metrics[-1]["grad_norm"])
    else:
        assert code != 0
        assert "FloatingPointError: step 2: loss is" in run.log() and "stopping" in run.log(), run.log()[-3000:]
