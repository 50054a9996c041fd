"""Measured vs estimated peak memory of one rank's training step (validates torchtitan_sp.estimate).

    python scripts/bench_memory.py [--cases none,full,...] [--tokens N] [--steps 2] [--out mem.json]
                                   [trainer overrides...]

On a GPU: Llama-3-8B cut to 4 blocks (full 128256 vocabulary), one rank's share of a long sequence
(--tokens, default 16384 = 131072 / cp 8; the AC cases run 4x that), bf16 FSDP2 on one rank,
fused AdamW, the real chunked loss, run by the Trainer; measured = torch.cuda.max_memory_allocated
over the steps after the first. The goal: within 10% of the estimate. On a CPU (smoke test): the
debug model, measured = peak of live tensor bytes over forward + backward (LiveTensorBytes; the
optimizer step is left out, so the estimate's optimizer-step phase is too).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch
import torch.distributed as dist

from torchtitan_sp.config import load_config
from torchtitan_sp.loss import model_loss_sum
from torchtitan_sp.memory_measure import LiveTensorBytes
from torchtitan_sp.memory_model import GIB, Setup, estimate
from torchtitan_sp.rules import validate
from torchtitan_sp.train import Trainer

# name: (overrides, multiple of --tokens)
CASES: dict[str, tuple[list[str], int]] = {
    "none": (["--activation_checkpoint.mode", "none"], 1),
    "sac_op": (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"], 1),
    "full": (["--activation_checkpoint.mode", "full"], 4),
    "full_tiled": (["--activation_checkpoint.mode", "full", "--activation_checkpoint.tiled_mlp_shards", "8"], 4),
    "full_tiled_offload": (["--activation_checkpoint.mode", "full", "--activation_checkpoint.tiled_mlp_shards", "8",
                            "--activation_checkpoint.offload", "true"], 4),
}
GPU_DEFAULTS = ["--model.flavor", "8B", "--model.n_layers", "4", "--optimizer.implementation", "fused"]
CPU_DEFAULTS = ["--model.flavor", "debug", "--model.n_layers", "3"]
COMMON = ["--config", "", "--training.dataset", "synthetic", "--metrics.enable_tensorboard", "false",
          "--job.dump_folder", "./outputs/bench_memory", "--training.local_batch_size", "1"]


def measure(argv: list[str], steps: int) -> dict:
    """Train `steps` steps of the run `argv` on this rank (all ranks of the process group, if one is up);
    its measured and estimated peak."""
    cfg = load_config(argv)
    dims = validate(cfg, world_size=dist.get_world_size() if dist.is_initialized() else 1)
    trainer = Trainer(cfg, dims)
    data = iter(trainer.dataloader)
    cuda = trainer.device.type == "cuda"
    tracker = LiveTensorBytes()
    tracker.track(list(trainer.model.parameters()))
    for i in range(steps):
        batches = [next(data) for _ in range(trainer.grad_accum)]
        if cuda:
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
            trainer.train_step(batches)
            continue
        # CPU: forward + backward as train_step runs them, under the tracker
        with tracker:
            if i == 1:
                tracker.reset_peak()
            for mb in batches:
                with trainer._step_context():  # loss parallel under TP, as train_step
                    loss = model_loss_sum(trainer.model, trainer._shard(mb), trainer.cfg.training.document_masks,
                                          ce=trainer.ce)
                    (loss / mb["labels"].numel()).backward()
                del loss
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        tracker.track(trainer.optimizer.state)
    est = estimate(Setup.from_config(cfg, dims, trainer.device.type), trainer.grad_accum)
    phases = {k: v for k, v in est["phases"].items() if cuda or k != "optimizer step"}
    phase = max(phases, key=phases.get)
    r = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
         "flavor": cfg.model.flavor, "n_layers": trainer.model_args.n_layers, "tokens": cfg.training.seq_len,
         "ac": cfg.activation_checkpoint.mode, "tiles": cfg.activation_checkpoint.tiled_mlp_shards,
         "offload": cfg.activation_checkpoint.offload,
         "measured_gib": (torch.cuda.max_memory_allocated() if cuda else tracker.peak) / GIB,
         "estimated_gib": phases[phase] / GIB, "estimated_phase": phase}
    if cuda:
        r["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    r["ratio"] = r["measured_gib"] / r["estimated_gib"]
    trainer.metrics.close()
    del trainer, data
    gc.collect()  # FSDP hooks make reference cycles: free this model before the next case's
    if cuda:
        torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tokens", type=int, default=0, help="tokens per rank (default 16384 on GPU, 1024 on CPU)")
    ap.add_argument("--steps", type=int, default=2, help="the first is a warm-up")
    ap.add_argument("--out", default="")
    args, overrides = ap.parse_known_args()
    cuda = torch.cuda.is_available()
    tokens = args.tokens or (16384 if cuda else 1024)
    results = []
    for name in args.cases.split(","):
        extra, mult = CASES[name]
        argv = [*COMMON, *(GPU_DEFAULTS if cuda else CPU_DEFAULTS), "--training.seq_len", str(tokens * mult),
                *extra, *overrides]
        r = {"case": name, **measure(argv, args.steps)}
        results.append(r)
        print(f"{name:<20} {r['tokens']:>8} tokens  measured {r['measured_gib']:7.2f} GiB  "
              f"estimated {r['estimated_gib']:7.2f} GiB ({r['estimated_phase']})  ratio {r['ratio']:.3f}", flush=True)
    # Ratios first: summaries that print the head of this JSON show them.
    summary = {key: {r["case"]: round(r[key], 3) for r in results}
               for key in ("ratio", "measured_gib", "estimated_gib")}
    summary.update(device=results[0]["device"], torch=results[0]["torch"], details=results)
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
