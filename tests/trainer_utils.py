"""Run the real Trainer in test processes and read back what it logged."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.distributed as dist

from torchtitan_sp.config import Config, load_config
from torchtitan_sp.data import build_dataloader
from torchtitan_sp.models.shape import model_args
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


def resumed_loader_matches(cfg: Config, skip: int, count: int, dp_rank: int = 0, dp_size: int = 1):
    """Read `skip` batches, save the loader's state through serialization (as a checkpoint would), read
    `count` more; a new loader given that state must yield the same `count` batches. Returns both loaders
    and the saved state."""
    loader = build_dataloader(cfg, model_args(cfg.model).vocab_size, dp_rank, dp_size)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    buf = io.BytesIO()
    torch.save(saved := loader.state_dict(), buf)
    expected = [next(it) for _ in range(count)]
    resumed = build_dataloader(cfg, model_args(cfg.model).vocab_size, dp_rank, dp_size)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    rit = iter(resumed)
    for a, b in zip(expected, [next(rit) for _ in range(count)], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return loader, resumed, saved
