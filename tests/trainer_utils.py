"""Run the real Trainer in test processes and read back what it logged."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from torchtitan_sp.config import load_config
from torchtitan_sp.rules import validate
from torchtitan_sp.train import Trainer


def read_metrics(dump_folder: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(dump_folder) / "metrics.jsonl").read_text().splitlines()]


def train(rank: int, world_size: int, argv: list[str]) -> list[dict] | None:
    """Train with `argv` overrides on this rank (process group already up); rank 0 returns the
    logged metrics (log_freq should be 1 to see every step)."""
    cfg = load_config(argv)
    Trainer(cfg, validate(cfg, world_size)).train()
    dist.barrier()
    return read_metrics(cfg.job.dump_folder) if rank == 0 else None


def tiny_args(dump_folder: str | Path, *extra: str) -> list[str]:
    """The debug model at a test-sized shape, logging every step."""
    return ["--job.dump_folder", str(dump_folder), "--training.seq_len", "64", "--training.steps", "5",
            "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", *extra]
