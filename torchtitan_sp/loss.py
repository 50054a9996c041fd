"""Token-weighted cross-entropy: each rank returns the SUM over its valid tokens; the trainer
divides by the global count of valid tokens (all data-parallel and cp ranks, all micro-batches),
so the loss and gradients equal a single process's mean over the whole global batch.

The loss is chunked over tokens: Llama 3's fp32 logits are 128256 x 4 B = 0.5 MB per token, so at
long sequences they would be the largest tensor of the step (TorchTitan's first memory wall on one
GPU). Each chunk's output projection + cross-entropy runs under activation checkpointing: forward
keeps only the chunk's scalar loss, backward recomputes one chunk's logits at a time.

With compile.enable (and no TP) the cross-entropy itself is compiled, as TorchTitan's
compile.components = ["loss"] does: the fp32 upcast, log-softmax and its backward fuse into a
few passes over the 16-bit logits instead of eager's fp32 copies (12 B per logit -> 2 x 2 B).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint

from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.parallelize.memory import activation_offload

# fp32 logits bytes per loss chunk: large enough for an efficient output matmul, small next to the
# activations (backward holds three such fp32 buffers at once, plus the bf16 logits' gradient).
LOSS_CHUNK_BYTES = 256 * 2**20


# Below this many bytes of fp32 logits per micro-batch the loss runs in one piece: no chunk is
# recomputed in backward (at 8K tokens of Llama 3 that recomputation is ~7% of a step).
LOSS_UNCHUNKED_MAX_BYTES = 4 * 2**30


def loss_is_chunked(tokens: int, vocab_size: int) -> bool:
    """Whether model_loss_sum chunks a micro-batch of `tokens` rows over a (local) vocabulary."""
    return 4 * tokens * vocab_size > LOSS_UNCHUNKED_MAX_BYTES


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per loss chunk for a vocabulary of `vocab_size` columns."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the fp32 cross-entropy over labels != IGNORE_INDEX; logits (..., V), labels (...).
    A shard whose labels are all ignored gives 0, not NaN."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


CrossEntropySum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

@functools.cache
def compiled_cross_entropy_sum() -> CrossEntropySum:
    """cross_entropy_sum under torch.compile (made on first use: importing dynamo costs ~1 s).
    Static shapes: one graph for the whole micro-batch, or two for chunks (the last may be shorter)."""
    return torch.compile(cross_entropy_sum, dynamic=False)


def _chunk_loss(output: nn.Module, h: torch.Tensor, labels: torch.Tensor, ce: CrossEntropySum) -> torch.Tensor:
    return ce(output(h), labels)


def chunked_cross_entropy_sum(output: nn.Module, h: torch.Tensor, labels: torch.Tensor,
                              chunk_tokens: int, ce: CrossEntropySum = cross_entropy_sum) -> torch.Tensor:
    """ce(output(h), labels) without holding more than `chunk_tokens` rows of logits.

    h (B, S, dim), labels (B, S). `output` is called as a module, so the hooks that TP (and FSDP,
    through the root's forward) put on it run for every chunk, in forward and in recomputation.
    """
    if isinstance(h, DTensor):
        # TP-SP: h is Shard(1) over the sequence. The output projection all-gathers it anyway
        # (ColwiseParallel), so gather once and chunk the replicated tensor: each chunk's
        # logits are then Shard(-1) over the vocabulary (loss parallel) or replicated.
        h = h.redistribute(placements=[Replicate()] * h.device_mesh.ndim)
    h, labels = h.flatten(0, 1), labels.flatten()  # (B*S, dim), (B*S,)
    total = None
    for h_c, y_c in zip(h.split(chunk_tokens), labels.split(chunk_tokens)):
        loss = checkpoint(_chunk_loss, output, h_c, y_c, ce, use_reentrant=False, preserve_rng_state=False)
        total = loss if total is None else total + loss
    return total


def model_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], use_document_mask: bool,
                   chunk_tokens: int | None = None, ce: CrossEntropySum = cross_entropy_sum) -> torch.Tensor:
    """Forward one (cp-sharded) micro-batch and return its summed loss (`ce` per logits chunk).

    `model.hidden_states` is registered as an FSDP forward method (parallelize.fsdp), so the root
    unshards there and keeps the output projection unsharded through the chunked loss and its backward.
    """
    docs = batch["document_ids"] if use_document_mask else None
    with activation_offload(model):  # pinned-CPU copies of full-AC block inputs, when enabled
        h = model.hidden_states(batch["tokens"], batch["positions"], docs)  # (B, S, dim)
    # Sized by the full vocabulary: under loss-parallel TP a chunk's logits are 1/tp of that.
    if chunk_tokens is None:
        if not loss_is_chunked(batch["labels"].numel(), model.args.vocab_size):
            return ce(model.output(h), batch["labels"])
        chunk_tokens = loss_chunk_tokens(model.args.vocab_size)
    return chunked_cross_entropy_sum(model.output, h, batch["labels"], chunk_tokens, ce)
