"""Context parallel training end to end: every strategy against one process over 5 optimizer steps."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from tests.test_logged_values import check_first_step, check_tps
from tests.test_train import assert_close, losses
from tests.trainer_utils import read_metrics, tiny_args, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return run_distributed(train, 1, tiny_args(tmp_path_factory.mktemp("ref"), "--training.local_batch_size", "2"))[0]


@pytest.mark.parametrize("world, extra", [
    (4, ["--training.local_batch_size", "2", "--parallelism.context_parallel_degree", "4"]),  # dp1 x cp4 ring
    (4, ["--training.local_batch_size", "1", "--parallelism.context_parallel_degree", "2",
         "--parallelism.context_parallel_rotate_method", "alltoall"]),  # dp2 x cp2 ring
    (4, ["--training.local_batch_size", "1", "--parallelism.context_parallel_degree", "2",
         "--parallelism.context_parallel_strategy", "ulysses"]),  # dp2 x cp2 ulysses
    (4, ["--training.local_batch_size", "2", "--parallelism.context_parallel_degree", "4",
         "--parallelism.context_parallel_strategy", "usp", "--parallelism.context_parallel_ulysses_degree", "2"]),
    (2, ["--training.local_batch_size", "2", "--parallelism.context_parallel_degree", "2",
         "--parallelism.context_parallel_strategy", "allgather",
         "--parallelism.context_parallel_load_balancer", "none"]),
], ids=["cp4-ring", "dp2cp2-ring-alltoall", "dp2cp2-ulysses", "cp4-usp2x2", "cp2-allgather-contiguous"])
def test_cp_matches_single_process(tmp_path, reference, world, extra):
    argv = tiny_args(tmp_path, *extra)
    metrics = run_distributed(train, world, argv)[0]
    assert_close(losses(metrics), losses(reference), 1e-5)
    assert_close([m["grad_norm"] for m in metrics], [m["grad_norm"] for m in reference], 1e-4)
    assert [m["tokens_seen"] for m in metrics] == [m["tokens_seen"] for m in reference]
    dp = world // int(extra[extra.index("--parallelism.context_parallel_degree") + 1])
    if dp == 1:  # the only data-parallel group is the worst one: its cp ranks' shares summed
        assert all(m["loss_max"] == pytest.approx(m["loss"], rel=1e-9) for m in metrics)
    else:  # the worse group's own mean, computed on one process
        check_first_step(metrics, argv, dp)
    lbs = int(extra[extra.index("--training.local_batch_size") + 1])
    check_tps(metrics, lbs * 64 * dp, world)


def test_cpu_offload_matches_single_process(tmp_path, reference):
    """FSDP2's CPU offload (unpinned on CPU: the same policy, hooks and host-side optimizer step) with
    dp2 x cp2, full AC and tiled MLP logs what one process logs."""
    extra = ["--training.local_batch_size", "1", "--parallelism.context_parallel_degree", "2",
             "--training.enable_cpu_offload", "true", "--activation_checkpoint.mode", "full",
             "--activation_checkpoint.tiled_mlp_shards", "2"]
    metrics = run_distributed(train, 4, tiny_args(tmp_path, *extra))[0]
    assert_close(losses(metrics), losses(reference), 1e-5)
    assert_close([m["grad_norm"] for m in metrics], [m["grad_norm"] for m in reference], 1e-4)
    applied = json.loads((tmp_path / "config.json").read_text())["applied"]
    assert any("CPU offload" in a for a in applied), applied


def test_packed_documents_under_cp(tmp_path):
    """Real text, packed with per-document positions and a document-causal mask: every strategy
    (head-tail; cp2, usp as 2 x 2 on cp4, ring also under tp2) logs what one process logs. The documents
    are short, so every window holds several: attention leaking across them would change the loss."""
    words = "the of and to in is for on with as by at from this that which be or are".split()
    docs = [" ".join(words[(7 * i + j) % len(words)] for j in range(3 + i % 11)) for i in range(300)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = ["--training.dataset", "files", "--training.dataset_path", str(corpus), "--training.packing", "true",
            "--training.local_batch_size", "1", "--training.steps", "3"]
    ref = run_distributed(train, 1, tiny_args(tmp_path / "ref", *data))[0]
    for strategy, cp, tp in (("allgather", 2, 1), ("ulysses", 2, 1), ("ring", 2, 1), ("usp", 4, 1), ("ring", 2, 2)):
        extra = ["--parallelism.context_parallel_ulysses_degree", "2"] if strategy == "usp" else []
        m = run_distributed(train, cp * tp, tiny_args(tmp_path / f"{strategy}-cp{cp}-tp{tp}", *data, *extra,
                                                       "--parallelism.context_parallel_degree", str(cp),
                                                       "--parallelism.tensor_parallel_degree", str(tp),
                                                       "--parallelism.context_parallel_strategy", strategy))[0]
        assert_close(losses(m), losses(ref), 1e-5)
        assert [x["tokens_seen"] for x in m] == [x["tokens_seen"] for x in ref]


def test_run_train_sh_cp2_equals_cp1(tmp_path):
    """The same recipe through run_train.sh with cp=1 and cp=2 logs the same loss and tokens seen."""
    runs = {}
    for cp in (1, 2):
        dump = tmp_path / f"cp{cp}"
        r = subprocess.run(["./run_train.sh", "--job.dump_folder", str(dump), "--training.steps", "6",
                            "--metrics.log_freq", "1", "--parallelism.context_parallel_degree", str(cp),
                            "--parallelism.data_parallel_shard_degree", "1", "--training.seq_len", "128"],
                           cwd=REPO, env={**os.environ, "NGPU": str(cp)}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        runs[cp] = read_metrics(dump)
    assert_close(losses(runs[2]), losses(runs[1]), 1e-5)
    assert [m["tokens_seen"] for m in runs[2]] == [m["tokens_seen"] for m in runs[1]]
