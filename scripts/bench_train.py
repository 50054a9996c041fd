"""Training throughput of a recipe on this machine: tokens/s, TFLOP/s, MFU and peak memory.

    python scripts/bench_train.py [--steps 10] [--warmup 3] [--out bench.json] [--ablate CHANGE]
                                  [trainer overrides...]

Without overrides on a GPU it runs the issue's benchmark shape: Llama-3-8B cut to 4 blocks (full
128256 vocabulary), seq 8192, bf16 FSDP2 mixed precision, fused AdamW, per-block compile; on a
CPU the debug model. One process (torchrun not needed). Steps are timed after warm-up (compile)
with the device synchronised; the median step time gives tokens/s.

`--ablate` undoes one of the speed changes that have no config key, to measure what it is worth:
`eager_loss` (the eager cross-entropy instead of the compiled one) or `host_syncs` (the three extra
host syncs per step that train_step used to make: loss, gradient norm, valid-token count).
The other two have keys: `--parallelism.fsdp_reshard_after_forward always` and
`--optimizer.implementation foreach` (clip, then step).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from torchtitan_sp.config import load_config
from torchtitan_sp.loss import cross_entropy_sum
from torchtitan_sp.memory_model import Setup, estimate
from torchtitan_sp.rules import validate
from torchtitan_sp.train import Trainer

GPU_DEFAULTS = ["--model.flavor", "8B", "--model.n_layers", "4", "--training.seq_len", "8192",
                "--training.local_batch_size", "1", "--compile.enable", "true",
                "--optimizer.implementation", "fused", "--activation_checkpoint.mode", "none",
                "--optimizer.lr", "3e-4", "--lr_scheduler.warmup_steps", "200"]  # as the TorchTitan anchor
COMMON = ["--training.dataset", "synthetic", "--metrics.enable_tensorboard", "false",
          "--job.dump_folder", "./outputs/bench_train", "--checkpoint.enable", "false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--profile", default="", help="write the top kernels of one more step to this file")
    ap.add_argument("--ablate", choices=["eager_loss", "host_syncs"], help="undo one speed change (see above)")
    args, overrides = ap.parse_known_args()
    defaults = GPU_DEFAULTS if torch.cuda.is_available() else []
    argv = [*defaults, *COMMON, *overrides, "--training.steps", str(args.warmup + args.steps)]
    cfg = load_config(argv)
    trainer = Trainer(cfg, validate(cfg, world_size=1))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if args.ablate == "eager_loss":
        trainer.ce = cross_entropy_sum
    elif args.ablate == "host_syncs":
        grad_norm = trainer._grad_norm

        def synced_grad_norm() -> torch.Tensor:
            for _ in range(3):  # as .item() on the loss, the norm and the count did before the step
                sync()
            return grad_norm()

        trainer._grad_norm = synced_grad_norm

    data = iter(trainer.dataloader)
    times, first = [], 0.0
    for i in range(args.warmup + args.steps):
        batches = [next(data) for _ in range(trainer.grad_accum)]
        if i == args.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        out = trainer.train_step(batches)
        sync()
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= args.warmup:
            times.append(dt)
    step_s = statistics.median(times)
    t, a = cfg.training, trainer.model_args
    tps = trainer.tokens_per_step / step_s  # one rank
    n_emb = a.vocab_size * a.dim
    # Two MFU conventions: TorchTitan's logs (full S x S attention) and the anchors' causal count.
    flops_full = trainer.flops_per_token
    flops_causal = 6 * (trainer.n_params - n_emb) + 6 * a.n_layers * a.dim * t.seq_len
    r = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
         "torch": torch.__version__, "flavor": cfg.model.flavor, "n_layers": a.n_layers, "seq_len": t.seq_len,
         "compile": cfg.compile.enable, "ac": cfg.activation_checkpoint.mode, "ablate": args.ablate,
         "cpu_offload": cfg.training.enable_cpu_offload, "act_offload": cfg.activation_checkpoint.offload,
         "params": trainer.n_params, "step_s": round(step_s, 4), "first_step_s": round(first, 1),
         "tok_s": round(tps), "loss": round(out["loss"], 4),
         "tflops": round(flops_full * tps / 1e12, 1), "tflops_causal": round(flops_causal * tps / 1e12, 1)}
    if trainer.peak:
        r["mfu_pct"] = round(100 * r["tflops"] / trainer.peak, 1)
        r["mfu_causal_pct"] = round(100 * r["tflops_causal"] / trainer.peak, 1)
        r["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        r["estimated_peak_gib"] = round(estimate(Setup.from_config(cfg, trainer.dims), trainer.grad_accum)["peak"]
                                        / 2**30, 2)
        r["host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            trainer.train_step([next(data) for _ in range(trainer.grad_accum)])
            sync()
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
