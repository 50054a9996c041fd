"""The memory estimator: its arithmetic, its agreement with measured CPU memory, the goals it
predicts, its CLI, and the plots made from it and from metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from torchtitan_sp.config import load_config
from torchtitan_sp.estimate import main as estimate_main
from torchtitan_sp.memory_model import (
    GIB,
    Setup,
    attention_buffers,
    estimate,
    fits,
    layer_saved,
    loss_bytes,
    max_seq_len,
    param_counts,
)
from torchtitan_sp.memory_report import cp_strategies, fit_advice, host_advice, memory_options
from torchtitan_sp.models.llama3 import FLAVORS
from torchtitan_sp.rules import validate

REPO = Path(__file__).resolve().parent.parent


def setup(*overrides: str, world: int = 8, device: str = "cuda") -> Setup:
    cfg = load_config(["--config", "llama8b_cp4.toml", *overrides])
    return Setup.from_config(cfg, validate(cfg, world), device)


def test_memory_options_are_cumulative_and_valid_for_the_mesh():
    cols = memory_options(setup())
    assert list(cols) == ["no AC", "full AC", "+ tiled MLP 8", "+ offload", "+ CPU offload"]
    assert (cols["+ offload"].tiles, cols["+ offload"].offload, cols["+ offload"].cpu_offload) == (8, True, False)
    assert (cols["+ CPU offload"].offload, cols["+ CPU offload"].cpu_offload) == (True, True)
    # TP does not combine with tiled MLP (validation rejects it): no such column, nor in the advice.
    tp = memory_options(setup("--parallelism.tensor_parallel_degree", "2",
                              "--parallelism.data_parallel_shard_degree", "1"))
    assert list(tp) == ["no AC", "full AC", "+ offload", "+ CPU offload"] and tp["+ offload"].tiles == 1
    # On CPU nothing is offloaded: the trainer's CPU runs keep everything in (host) memory anyway.
    assert list(memory_options(setup(device="cpu"))) == ["no AC", "full AC", "+ tiled MLP 8"]


def test_llama8b_arithmetic():
    n, root, block = param_counts(FLAVORS["8B"])
    assert (n, root, block) == (8_030_261_248, 1_050_677_248, 218_112_000)
    s = setup("--activation_checkpoint.mode", "none")
    attn, ffn = layer_saved(s)
    # ~0.17 MB per token per layer in bf16 without AC (TorchTitan's model, with fp32 RoPE copies: ~0.19)
    assert 0.15e6 < attn + ffn < 0.19e6
    t = s.tokens
    full = estimate(dataclasses.replace(s, ac_mode="full"))
    assert full["activations kept (all layers)"] == pytest.approx(32 * 8192 * t + 4 * 128 * t)  # block inputs + rope
    # Unchunked eager, backward holds fp32 logit-sized buffers: TorchTitan's OOM at 32K was one 15.66 GiB
    # of them. Compiled (the recipe compiles), the bf16 logits and their gradient: 15.66 GiB together.
    plain = loss_bytes(dataclasses.replace(s, chunked_loss=False, compiled_loss=False, seq_len=32768, cp=1))
    assert plain >= 3 * 15.66 * GIB
    compiled = loss_bytes(dataclasses.replace(s, chunked_loss=False, seq_len=32768, cp=1))
    assert s.compiled_loss and compiled == pytest.approx(15.66 * GIB, rel=1e-3)
    assert loss_bytes(s) < 1 * GIB
    # Packed documents: the ring runs as allgather with one KV head per stride.
    docs = dataclasses.replace(s, document_masks=True)
    assert attention_buffers(docs) == attention_buffers(dataclasses.replace(docs, strategy="allgather"))
    offload = estimate(dataclasses.replace(s, ac_mode="full", offload=True))
    assert offload["host memory (offloaded block inputs)"] == 32 * 8192 * t
    assert offload["peak"] < full["peak"] - 0.9 * 32 * 8192 * t


def test_longest_seq_len_does_not_depend_on_the_configured_one():
    """The loss chunks itself once a micro-batch's logits pass 4 GiB, so the seq_len table of a recipe
    at 8K (unchunked there) equals the table of the same recipe at 64K (was 190K vs 454K for the 4-layer
    8B stack with tiled MLP on an H100: the 8K setup kept its unchunked loss at every length)."""
    stack = ("--parallelism.context_parallel_degree", "1", "--parallelism.data_parallel_shard_degree", "1",
             "--model.n_layers", "4", "--activation_checkpoint.mode", "full",
             "--activation_checkpoint.tiled_mlp_shards", "8")
    short, long = setup(*stack, "--training.seq_len", "8192", world=1), setup(*stack, "--training.seq_len",
                                                                                "65536", world=1)
    assert (short.chunked_loss, long.chunked_loss) == (False, True)
    assert max_seq_len(short, 79.0) == max_seq_len(long, 79.0) > 256 * 1024


def test_cpu_offload_moves_the_states_to_the_host():
    """training.enable_cpu_offload: the 16 B per parameter (fp32 shard, gradient, two AdamW states)
    leave the device for the host; blocks are resharded even when FSDP spans one rank; the estimator's
    advice names CPU offload when nothing else fits, and the host check names the node's RAM."""
    one_gpu = ("--parallelism.context_parallel_degree", "1", "--parallelism.data_parallel_shard_degree", "1",
               "--training.seq_len", "65536", "--activation_checkpoint.mode", "full")
    s = setup(*one_gpu, world=1)
    off = setup(*one_gpu, "--training.enable_cpu_offload", "true", world=1)
    assert (s.reshard, off.reshard, off.cpu_offload) == (False, True, True)
    n = param_counts(s.args)[0]
    est, est_off = estimate(s), estimate(off)
    assert est_off["host memory (parameters, gradients, optimizer states)"] == 16 * n
    assert est_off["parameters (fp32, sharded)"] == est_off["optimizer states (AdamW, fp32, sharded)"] == 0
    assert est_off["peak"] < est["peak"] - 12 * n  # the 16 B/param less some transient copies
    assert estimate(dataclasses.replace(off, device="cpu", cpu_offload=False))["host memory (parameters, " \
        "gradients, optimizer states)"] == 0
    advice = fit_advice(s, 79.0, 1, "default")
    assert advice.startswith("does not fit") and "+ CPU offload" in advice
    assert fits(options := memory_options(s)["+ CPU offload"], 79.0) and not fits(dataclasses.replace(
        options, cpu_offload=False), 79.0)
    host = host_advice(off, 128.0, world_size=1)
    assert host == f"host memory per node: 1 rank x {16 * n / GIB:.2f} GiB = {16 * n / GIB:.2f} GiB of 128.0 GiB"
    assert "does not fit the host" in host_advice(off, 100.0, world_size=1)
    assert host_advice(s, 100.0, world_size=1) is None


def _bench(rank: int, world: int, argvs: list[list[str]], small_chunks: bool = True) -> list[dict]:
    import torchtitan_sp.loss
    from scripts.bench_memory import measure

    if small_chunks:  # as for Llama 3's vocabulary, so that the activations dominate the peak
        torchtitan_sp.loss.LOSS_CHUNK_BYTES = 2**20
        torchtitan_sp.loss.LOSS_UNCHUNKED_MAX_BYTES = 0  # chunk even these small logits
    return [measure(argv, steps=2) for argv in argvs]


def test_estimate_within_15_percent_of_measured_cpu(tmp_path):
    """The real trainer's model, FSDP2 (one rank), chunked loss; peak of live tensor bytes."""
    base = ["--config", "", "--model.flavor", "debug", "--model.n_layers", "3", "--training.seq_len", "2048",
            "--training.local_batch_size", "1", "--metrics.enable_tensorboard", "false",
            "--job.dump_folder", str(tmp_path)]
    cases = [["--activation_checkpoint.mode", "none"], ["--activation_checkpoint.mode", "full"],
             ["--activation_checkpoint.mode", "full", "--activation_checkpoint.tiled_mlp_shards", "4"]]
    results = run_distributed(_bench, 1, [base + c for c in cases])[0]
    for case, r in zip(cases, results):
        assert 0.85 < r["ratio"] < 1.15, (case, r)
        assert r["estimated_phase"].startswith("top block backward"), r  # activations, not the loss
    none, full, tiled = (r["measured_gib"] for r in results)
    assert tiled < full < 0.7 * none


def test_cp_estimate_within_15_percent_of_measured_cpu(tmp_path):
    """cp 2 over two processes, one tiled block with full AC, so that the peak is in the attention's
    backward and the strategy's buffers (gathered/rotated K/V, fp32 accumulators) are what is checked."""
    base = ["--config", "", "--model.flavor", "debug", "--model.n_layers", "1", "--training.seq_len", "8192",
            "--training.local_batch_size", "1", "--metrics.enable_tensorboard", "false",
            "--job.dump_folder", str(tmp_path), "--parallelism.context_parallel_degree", "2",
            "--activation_checkpoint.mode", "full", "--activation_checkpoint.tiled_mlp_shards", "8"]
    cases = {"ring": ["--parallelism.context_parallel_strategy", "ring"],
             "ring, packed documents": ["--parallelism.context_parallel_strategy", "ring",
                                        "--training.dataset", "stdlib"],
             "allgather": ["--parallelism.context_parallel_strategy", "allgather"],
             "ulysses": ["--parallelism.context_parallel_strategy", "ulysses"],
             # u = cp: a ring of one rank, which allocates no ring buffers (estimated 0.72x before)
             "usp, ulysses 2": ["--parallelism.context_parallel_strategy", "usp",
                                "--parallelism.context_parallel_ulysses_degree", "2"]}
    results = run_distributed(_bench, 2, [base + c for c in cases.values()])[0]
    for name, r in zip(cases, results):
        assert 0.85 < r["ratio"] < 1.15, (name, r)
        if name not in ("ulysses", "usp, ulysses 2"):
            assert r["estimated_phase"] == "top block backward, attention", (name, r)


def test_tp_estimate_within_15_percent_of_measured_cpu(tmp_path):
    """tp 2 over two processes (sequence parallel): the full-length gathers of the residual stream's
    gradient, selective AC whose top block is not checkpointed, and replicated logits without loss
    parallel (estimated 1.15x, 0.82x and 1.87x of the measured peak before they were modelled)."""
    base = ["--config", "", "--model.flavor", "debug", "--training.seq_len", "4096", "--training.local_batch_size", "1",
            "--metrics.enable_tensorboard", "false", "--job.dump_folder", str(tmp_path),
            "--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]
    three = ["--model.n_layers", "3", "--activation_checkpoint.mode", "full"]
    cases = {"full AC": three,
             "selective every 2 of 4 blocks": ["--model.n_layers", "4", "--activation_checkpoint.mode", "selective",
                                               "--activation_checkpoint.selective_ac_option", "2"]}
    results = run_distributed(_bench, 2, [base + c for c in cases.values()])[0]
    results += run_distributed(_bench, 2, [base + three + ["--parallelism.disable_loss_parallel", "true"]], False)[0]
    for name, r in zip([*cases, "no loss parallel, whole loss"], results):
        assert 0.85 < r["ratio"] < 1.15, (name, r)
    assert results[-1]["estimated_phase"] == "loss backward", results[-1]


def test_goals():
    """One H100: the 4-layer 8B stack trains >= 256K tokens; 8 x H100 with cp 8: >= 1M tokens
    without offload (tiled MLP), >= 4M with activation offload."""
    one = setup("--model.n_layers", "4", "--parallelism.context_parallel_degree", "1",
                "--parallelism.data_parallel_shard_degree", "1", "--activation_checkpoint.tiled_mlp_shards", "8",
                world=1)
    assert max_seq_len(one, 79) >= 256 * 1024
    cp8 = setup("--parallelism.context_parallel_degree", "8", "--parallelism.data_parallel_shard_degree", "1",
                "--activation_checkpoint.tiled_mlp_shards", "8")
    best = {}
    for row in cp_strategies(cp8):
        assert max_seq_len(row, 79) >= 2**20, row.strategy
        best[row.strategy] = max_seq_len(dataclasses.replace(row, offload=True), 79)
    assert max(best.values()) >= 4 * 2**20, best
    assert max_seq_len(dataclasses.replace(cp8, tiles=1), 79) < max_seq_len(cp8, 79)


def test_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torchtitan_sp.estimate", "--config", "llama8b_cp4.toml",
                        "--gpu_mem_gib", "80"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for text in ("world size 8", "32,768 tokens per rank", "peak of live tensors", "within 80 GiB",
                 "ring (rotate allgather)", "ulysses", "allgather (heads_k_stride 1)", "+ offload"):
        assert text in r.stdout, text
    # the recipe's degrees give the world size, and it fits
    assert "assumed" not in r.stdout and "\ndoes not fit" not in r.stdout
    bad = subprocess.run([sys.executable, "-m", "torchtitan_sp.estimate", "--config", "llama8b_cp4.toml",
                          "--world_size", "4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "world size is 4" in bad.stderr


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the estimator's CLI, run in this process."""
    try:
        estimate_main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, message", [
    (["--gpu_mem_gib"], "error: --gpu_mem_gib: needs a value"),
    (["--gpu_mem_gib", "--device", "cpu"], "error: --gpu_mem_gib: needs a value"),
    (["--gpu_mem_gib", "abc"], "error: --gpu_mem_gib: expected a positive number (GiB per GPU), got 'abc'"),
    (["--gpu_mem_gib=0"], "error: --gpu_mem_gib: expected a positive number (GiB per GPU), got '0'"),
    (["--world_size", "0"], "error: --world_size: expected a positive integer (ranks of the run), got '0'"),
    (["--world_size", "2.5"], "error: --world_size: expected a positive integer (ranks of the run), got '2.5'"),
    (["--device", "tpu"], "error: --device: 'tpu' is not valid; choose one of cuda | cpu"),
    (["--worldsize", "8"], "error: --worldsize: unknown option; the estimator's are --world_size N"),
], ids=["gpu_mem_gib-last", "gpu_mem_gib-then-option", "gpu_mem_gib-abc", "gpu_mem_gib=0", "world_size-0",
        "world_size-2.5", "device-tpu", "unknown-option"])
def test_cli_bad_option_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = cli(capsys, "--config", "llama8b_cp4.toml", *argv)
    assert (code, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1, err


def test_cli_help_prints_usage(capsys):
    code, out, err = cli(capsys, "--config", "llama8b_cp4.toml", "--help")
    assert (code, err) == (0, "")
    assert out.startswith("usage: python -m torchtitan_sp.estimate")
    for text in ("--world_size N", "--gpu_mem_gib G", "--device D",
                 "config keys (--section.key value): ./run_train.sh --help"):
        assert text in out, text


def test_cli_assumed_world_size_and_does_not_fit(capsys, monkeypatch):
    """llama3_70b leaves the world size open (dp_shard -1): the header says which one is assumed; at 8
    GPUs it needs 141 GiB per GPU, and the does-not-fit line names a world size that fits."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, _ = cli(capsys, "--config", "llama3_70b.toml")
    lines = out.splitlines()
    assert code == 0 and "; world size 8 (assumed): " in lines[0]
    assert lines[1] == ("world size 8 assumed (one 8-GPU node): the recipe's data_parallel_shard_degree = -1 takes "
                        "whatever world size the run has; set it with --world_size N")
    reserved = next(line.split()[-1] for line in lines if line.strip().startswith("reserved"))
    advice = [line for line in lines if line.startswith("does not fit")]
    # Only CPU offload, the last memory option, fits on 8 GPUs: the line says what it costs the host.
    host = re.search(r"CPU offload \(training.enable_cpu_offload: ([0-9.]+) GiB of host memory per rank\)", advice[0])
    assert advice == [f"does not fit: {reserved} GiB reserved per GPU > 79 GiB; it fits with full AC + offload "
                      f"+ CPU offload (training.enable_cpu_offload: {host[1]} GiB of host memory per rank), or more "
                      "GPUs: dp_shard 2 (world size 16)"]
    # at least the fp32 shard, gradient and AdamW states: 16 B per parameter over 8 ranks
    assert float(host[1]) > 16 * param_counts(FLAVORS["70B"])[0] / 8 / GIB
    # The seq_len tables of both cards; on the H100 nothing fits without CPU offload: "-", not "0K".
    h100 = lines.index(next(line for line in lines if line.startswith("[H100 80GB] longest seq_len within 79 GiB")))
    assert lines[h100 + 1].split() == ["no", "AC", "full", "AC", "+", "offload", "+", "CPU", "offload"]  # tp 8
    assert lines[h100 + 2].split()[:6] == ["local", "(cp", "1)", "-", "-", "-"]
    assert lines[h100 + 3] == "  -: does not fit even at the shortest seq_len tried, 16,384 (2 x cp x tp x 1024)"
    assert lines[h100 + 4].startswith("[H200 141GB] longest seq_len within 139 GiB per GPU")
    assert "0K" not in out

    code, out, _ = cli(capsys, "--config", "llama3_70b.toml", "--world_size", "16")
    assert code == 0 and "world size 16: " in out and "assumed" not in out and "\ndoes not fit" not in out
    monkeypatch.setenv("WORLD_SIZE", "32")
    code, out, _ = cli(capsys, "--config", "llama3_70b.toml")
    assert code == 0 and out.splitlines()[1].startswith("world size 32 from WORLD_SIZE: ")


def test_cli_does_not_fit_names_single_changes_that_fit(capsys):
    """llama8b_cp4 (33.9 GiB) in 30 GiB: each change the line names makes the estimate fit."""
    code, out, _ = cli(capsys, "--config", "llama8b_cp4.toml", "--gpu_mem_gib", "30")
    advice = [line for line in out.splitlines() if line.startswith("does not fit")]
    assert code == 0 and advice == [
        "does not fit: 33.90 GiB reserved per GPU > 30 GiB; it fits with full AC + tiled MLP 8 + offload, "
        "or more GPUs: dp_shard 4 (world size 16), or seq_len 98,304"]
    fixes = (["--activation_checkpoint.tiled_mlp_shards", "8", "--activation_checkpoint.offload", "true"],
             ["--world_size", "16", "--parallelism.data_parallel_shard_degree", "4"],
             ["--training.seq_len", "98304"])
    for fix in fixes:
        code, out, _ = cli(capsys, "--config", "llama8b_cp4.toml", "--gpu_mem_gib", "30", *fix)
        assert code == 0 and "\ndoes not fit" not in out, fix
    # one step short of each is still too much
    code, out, _ = cli(capsys, "--config", "llama8b_cp4.toml", "--gpu_mem_gib", "30",
                       "--activation_checkpoint.tiled_mlp_shards", "8")
    assert "\ndoes not fit" in out
    code, out, _ = cli(capsys, "--config", "llama8b_cp4.toml", "--gpu_mem_gib", "30", "--training.seq_len", "106496")
    assert "\ndoes not fit" in out


def test_plot_metrics_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    for name, scale in (("a", 1.0), ("b", 1.2)):
        (tmp_path / name).mkdir()
        rows = [{"step": i, "loss": scale * 5 / i, "grad_norm": 1.0, "lr": 1e-3, "tps": 1000.0 * scale,
                 **({"mfu": 40.0, "mem_gib": 30.0} if name == "a" else {})} for i in range(1, 6)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plots"
    r = subprocess.run([sys.executable, "scripts/plot_metrics.py", str(tmp_path / "a"),
                        str(tmp_path / "b" / "metrics.jsonl"), "--max_seq", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("loss", "tps", "mfu", "mem", "max_seq_vs_cp"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
