"""Tied embeddings (Llama 3.2 1B/3B) stay one parameter under FSDP2 and TP and train as one process does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.trainer_utils import read_metrics, tiny_args, train
from torchtitan_sp.models.hf import hf_config
from torchtitan_sp.models.llama3 import ModelArgs
from torchtitan_sp.rules import load_and_validate

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=160, tie_word_embeddings=True,
                 max_position_embeddings=128, rope_theta=10000.0, rope_scaling="llama3", rope_factor=8.0,
                 rope_original_max_position=32)


def _parallel_worker(rank: int, world: int, dump: str, argv: list[str]) -> dict[str, list[float]]:
    """dp 2 (FSDP2) and tp 2 in one launch; the tied weight stays one parameter in both."""
    from torchtitan_sp.train import Trainer
    out = {}
    for name, extra in (("dp2", ("--training.local_batch_size", "2")),
                        ("tp2", ("--parallelism.tensor_parallel_degree", "2"))):
        cfg, dims = load_and_validate(tiny_args(f"{dump}/{name}", *argv, *extra), world)
        trainer = Trainer(cfg, dims)
        m = trainer.model
        assert m.output.weight is m.tok_embeddings.weight and len(list(m.parameters())) == 2 + 9 * 2
        trainer.train()
        torch.distributed.barrier()
        out[name] = [r["loss"] for r in read_metrics(f"{dump}/{name}")]
    return out


def test_tied_embeddings_fsdp_and_tp_match_one_process(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config(ARGS)))
    argv = ["--training.steps", "3", "--model.flavor", "hf", "--model.hf_assets_path", str(hf),
            "--training.local_batch_size", "4"]
    ref = [r["loss"] for r in run_distributed(train, 1, tiny_args(tmp_path / "ref", *argv))[0]]
    got = run_distributed(_parallel_worker, 2, str(tmp_path), argv)[0]
    assert ref[-1] < ref[0] - 0.05, ref  # it trains
    for name, losses in got.items():
        assert losses == pytest.approx(ref, rel=1e-4), name
