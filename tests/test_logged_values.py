"""The logged numbers against plain arithmetic on one process: loss, loss_max and tokens_seen of the first
step from the same initial weights and batches with F.cross_entropy(ignore_index=-100), and tps from its
definition (tokens per step / world size / seconds per step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed
from tests.trainer_utils import tiny_args, train
from torchtitan_sp.config import load_config
from torchtitan_sp.data import build_dataloader
from torchtitan_sp.models.llama3 import Transformer, init_weights
from torchtitan_sp.models.shape import model_args


def first_step_by_hand(argv: list[str], dp: int) -> list[tuple[float, int]]:
    """Per data-parallel rank: (mean token loss, valid labels) of its first batch under the initial
    weights, on one process with plain F.cross_entropy."""
    cfg = load_config(argv)
    args = model_args(cfg.model)
    model = Transformer(args)
    init_weights(model, cfg.debug.seed)
    out = []
    for rank in range(dp):
        b = next(iter(build_dataloader(cfg, args.vocab_size, rank, dp)))
        with torch.no_grad():
            logits = model(b["tokens"], b["positions"], b["document_ids"] if cfg.training.document_masks else None)
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        out.append((loss.item(), int((b["labels"] != -100).sum())))
    return out


def check_first_step(metrics: list[dict], argv: list[str], dp: int) -> None:
    groups = first_step_by_hand(argv, dp)
    total = sum(n for _, n in groups)
    first = metrics[0]
    assert first["tokens_seen"] == total
    assert first["loss"] == pytest.approx(sum(loss * n for loss, n in groups) / total, rel=1e-5)
    assert first["loss_max"] == pytest.approx(max(loss for loss, _ in groups), rel=1e-5)


def check_tps(metrics: list[dict], tokens_per_step: int, world: int) -> None:
    """tps is tokens/s per device: the global batch's tokens / world size / seconds per step."""
    for m in metrics:
        assert m["tps"] * m["s_per_step"] == pytest.approx(tokens_per_step / world, rel=1e-6)


def test_padded_samples_loss_and_tokens_seen(tmp_path: Path) -> None:
    """Short documents, one per padded sample: most labels are padding, and each dp group holds a
    different number of valid ones (so the global mean is not the mean of the groups' means)."""
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    docs = [" ".join(words[(i + j) % 8] for j in range(2 + 5 * i % 17)) for i in range(40)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    argv = tiny_args(tmp_path / "run", "--training.dataset", "files", "--training.dataset_path", str(corpus),
                     "--training.packing", "false", "--training.steps", "2")
    metrics = run_distributed(train, 2, argv)[0]
    groups = first_step_by_hand(argv, 2)
    assert groups[0][1] != groups[1][1] and all(n < 2 * 64 - 30 for _, n in groups), groups  # padding
    check_first_step(metrics, argv, 2)
    check_tps(metrics, 2 * 64 * 2, 2)
