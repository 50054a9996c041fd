"""--job.dry_run: the mesh, the meta-device model, tokens per rank and the memory estimate, with
nothing allocated (an 8B model in fp32 would be 32 GB)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Runs the validate entry point (what run_train.sh calls) and prints this process's peak RSS.
RSS_WRAPPER = """
import resource, runpy, sys
sys.argv = ["validate", *sys.argv[1:]]
try:
    runpy.run_module("torchtitan_sp.validate", run_name="__main__")
finally:
    print("MAX_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def dry_run(*args: str, world: int = 8) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *args, "--job.dry_run"], cwd=REPO, text=True,
                       capture_output=True, timeout=120, env={**os.environ, "WORLD_SIZE": str(world)})
    return r.returncode, r.stdout + r.stderr


def test_llama8b_cp4_dry_run_prints_the_run_and_allocates_nothing():
    rc, out = dry_run("--config", "llama8b_cp4.toml")
    assert rc == 3, out  # handled: nothing to launch
    for text in ("world size 8", "mesh (dp_replicate, dp_shard, cp, tp) = (1, 2, 4, 1)",
                 "dp_shard_cp = dp_shard x cp = 8: FSDP2", "parameters 8,030,261,248",
                 "218,112,000 per block", "per rank after FSDP2 (/ 8): 1,003,782,656",
                 "CP ring 4", "AC full", "FSDP2 over 8",
                 "32,768 per rank in attention (/ cp 4)", "262,144 per optimizer step",
                 "optimizer states (AdamW, fp32, sharded)                   7.48",
                 "peak of live tensors", "longest seq_len within 79 GiB"):
        assert text in out, text
    rss_gib = int(out.split("MAX_RSS_KB")[1].split()[0]) / 2**20
    assert rss_gib < 1.5, rss_gib


def test_dry_run_with_overrides_and_wrong_world_size():
    rc, out = dry_run("--config", "llama8b_cp4.toml", "--parallelism.context_parallel_degree", "8",
                      "--parallelism.data_parallel_shard_degree", "1",
                      "--activation_checkpoint.tiled_mlp_shards", "8", "--activation_checkpoint.offload", "true")
    assert rc == 3, out
    for text in ("(1, 1, 8, 1)", "16,384 per rank in attention", "tiled MLP (8 tiles)", "activation offload",
                 "host memory: offloaded block inputs"):
        assert text in out, text
    rc, out = dry_run("--config", "llama8b_cp4.toml", world=4)
    assert rc == 2 and "world size is 4" in out


def test_run_train_sh_dry_run_uses_ngpu():
    r = subprocess.run(["./run_train.sh", "--config", "llama8b_cp4.toml", "--job.dry_run"], cwd=REPO, text=True,
                       capture_output=True, timeout=120, env={**os.environ, "NGPU": "8"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 8" in r.stdout and "torch.distributed.run" not in r.stdout


def test_dry_run_says_which_device_and_dtype_it_estimates(capsys, monkeypatch):
    """A dry run plans a GPU run (bf16 as configured) on any machine, and says so; without a GPU it
    adds that a run here would compute in fp32 on CPU (what the trainer's start-up line estimates)."""
    import torch

    from torchtitan_sp.config import load_config
    from torchtitan_sp.dry_run import dry_run as print_dry_run
    from torchtitan_sp.rules import validate

    cpu_note = ("; no GPU here: a run on this machine computes in fp32 on CPU, estimated by "
                "`python -m torchtitan_sp.estimate --device cpu --world_size 8` with the same arguments")
    for dtype, name in (("bfloat16", "bf16"), ("float32", "fp32")):
        # ulysses: the ring's block kernels take bf16 only (validation rejects fp32 with them on GPUs)
        cfg = load_config(["--config", "llama8b_cp4.toml", "--training.mixed_precision_param", dtype,
                           "--parallelism.context_parallel_strategy", "ulysses"])
        for gpu in (False, True):
            monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
            print_dry_run(cfg, validate(cfg, 8))
            lines = capsys.readouterr().out.splitlines()
            i = next(i for i, line in enumerate(lines) if line.startswith("memory estimate"))
            assert lines[i] == (f"memory estimate for CUDA GPUs of 79 GiB, compute in {name} "
                                "(training.mixed_precision_param)" + ("" if gpu else cpu_note))
            assert lines[i + 1].startswith(f"estimated memory per GPU (GiB), compute {name}, ")


def test_dry_run_says_when_it_does_not_fit():
    rc, out = dry_run("--config", "llama3_70b.toml", world=8)
    assert rc == 3, out
    advice = [line for line in out.splitlines() if line.startswith("does not fit: ")]
    assert len(advice) == 1 and advice[0].endswith(" GiB of host memory per rank), or more GPUs: "
                                                   "dp_shard 2 (world size 16)"), out
