"""Validation (forward only) vs training tokens/s on the same recipe, one process.

    python scripts/bench_eval.py [--steps 5] [--warmup 2] [--out bench_eval.json] [trainer overrides...]

Both read the synthetic stream at training.seq_len and training.local_batch_size: the training step
(forward, backward, optimizer) and the validation loop (torchtitan_sp.evaluate, no_grad, per-token
losses for the position buckets), each timed after warm-up with the device synchronised. On a GPU
the defaults are bench_train.py's (Llama-3-8B cut to 4 blocks, S = 8192, compile); on CPU the debug
model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_train import COMMON, GPU_DEFAULTS

from torchtitan_sp.config import load_config
from torchtitan_sp.rules import validate
from torchtitan_sp.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps, and timed validation passes")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="")
    args, overrides = ap.parse_known_args()
    defaults = GPU_DEFAULTS if torch.cuda.is_available() else []
    argv = [*defaults, *COMMON, *overrides, "--training.steps", str(args.warmup + args.steps),
            "--validation.enable", "true", "--validation.dataset", "synthetic", "--validation.steps", "2"]
    cfg = load_config(argv)
    cfg.validation.local_batch_size = cfg.training.local_batch_size  # the same batch as a training step
    trainer = Trainer(cfg, validate(cfg, world_size=1))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    data = iter(trainer.dataloader)
    steps = [[next(data) for _ in range(trainer.grad_accum)] for _ in range(args.warmup + args.steps)]
    train_s = [timed(lambda b=b: trainer.train_step(b)) for b in steps][args.warmup:]
    val_s = [timed(trainer.evaluator.validate) for _ in range(args.warmup + args.steps)][args.warmup:]
    t = cfg.training
    train_tps = trainer.tokens_per_step / statistics.median(train_s)
    val_tps = cfg.validation.steps * t.local_batch_size * t.seq_len / statistics.median(val_s)
    r = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
         "flavor": cfg.model.flavor, "n_layers": trainer.model_args.n_layers, "seq_len": t.seq_len,
         "local_batch_size": t.local_batch_size, "compile": cfg.compile.enable, "ac": cfg.activation_checkpoint.mode,
         "train_tok_s": round(train_tps), "val_tok_s": round(val_tps), "val_over_train": round(val_tps / train_tps, 2)}
    print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
