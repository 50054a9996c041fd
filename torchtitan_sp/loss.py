"""Token-weighted cross-entropy: each rank returns the SUM over its valid tokens; the trainer
divides by the global count of valid tokens (all data-parallel and cp ranks, all micro-batches),
so the loss and gradients equal a single process's mean over the whole global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan_sp.attention.sharding import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the fp32 cross-entropy over labels != IGNORE_INDEX; logits (B, S, V), labels (B, S).
    A shard whose labels are all ignored gives 0, not NaN."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def model_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], use_document_mask: bool) -> torch.Tensor:
    """Forward one (cp-sharded) micro-batch and return its summed loss."""
    logits = model(batch["tokens"], batch["positions"], batch["document_ids"] if use_document_mask else None)
    return cross_entropy_sum(logits, batch["labels"])
