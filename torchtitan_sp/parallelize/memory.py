"""Memory savers for long sequences (ALST-style): tiled feed-forward and activation offload.

Tiled MLP: the SwiGLU feed-forward runs over sequence tiles, each under activation checkpointing,
so its (B, S, ffn_hidden) intermediates (4 of them, ~3.5x the hidden size each for Llama 3) exist
for one tile at a time, in forward and in backward. Costs one extra feed-forward forward (~+25%
block compute without AC; nothing extra on top of full AC's recomputation besides the tile loop).

Activation offload: with full AC a block keeps only its input (B, S, dim) for backward; the offload
moves those inputs to pinned host memory during forward (on a side stream, overlapping the next
block) and brings each back when backward recomputes its block. Host memory per rank:
n_layers x tokens x dim x 2 B.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchtitan_sp.models.llama3 import FeedForward, Transformer

logger = logging.getLogger(__name__)

# Saved tensors smaller than this stay where they are (norm statistics and the like).
OFFLOAD_MIN_BYTES = 2**20


class TiledFeedForward(nn.Module):
    """FeedForward over `tiles` sequence tiles; reuses the original w1/w2/w3 (same parameter names)."""

    def __init__(self, ff: FeedForward, tiles: int):
        super().__init__()
        self.w1, self.w2, self.w3 = ff.w1, ff.w2, ff.w3
        self.tiles = tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, dim)
        outs = [checkpoint(FeedForward.forward, self, tile, use_reentrant=False, preserve_rng_state=False)
                for tile in x.chunk(self.tiles, dim=1)]
        return torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return f"tiles={self.tiles}"


def apply_tiled_mlp(model: Transformer, tiles: int) -> bool:
    """Replace every block's feed-forward by a TiledFeedForward; returns whether it was applied.
    (Not with TP, which validation rejects: w2's reduce-scatter would interleave the tiles.)"""
    if tiles <= 1:
        return False
    for block in model.layers.values():
        block.feed_forward = TiledFeedForward(block.feed_forward, tiles)
    logger.info(f"tiled MLP: each feed-forward runs over {tiles} sequence tiles with recomputation")
    return True


def offloadable(t: torch.Tensor) -> bool:
    """An activation worth moving: on an accelerator, produced by autograd (not a leaf: compiled
    blocks save their weights, which FSDP owns), and not small."""
    return t.device.type != "cpu" and t.grad_fn is not None and t.nbytes >= OFFLOAD_MIN_BYTES


class _OffloadToHost(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations that are `offloadable` go to pinned host memory. Copies out run on a side
    stream; the compute stream reuses a tensor's memory only once its copy is done (record_stream).
    Copies back run on the compute stream when backward asks."""

    _streams: dict[torch.device, torch.Stream] = {}

    def __init__(self) -> None:
        super().__init__(self._pack, self._unpack)

    @classmethod
    def _pack(cls, t: torch.Tensor) -> object:
        if not offloadable(t):
            return t
        mod = torch.get_device_module(t.device)
        if t.device not in cls._streams:
            cls._streams[t.device] = mod.Stream(t.device)
        stream = cls._streams[t.device]
        stream.wait_stream(mod.current_stream(t.device))
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        with mod.stream(stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)
        return t.device, host, stream.record_event()

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        torch.get_device_module(device).current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


def apply_activation_offload(model: Transformer) -> None:
    """Mark the model so that model_loss_sum runs its blocks under _OffloadToHost.

    Only with full AC (validation rejects other modes): then the tensors saved outside checkpointed
    regions are the block inputs (plus the final norm's input); inside a checkpoint the checkpoint's
    own hooks take precedence. With other modes the hooks would move every saved activation over PCIe.
    """
    model.offload_activations = True
    logger.info("activation offload: full-AC block inputs kept in pinned host memory")


def activation_offload(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context to run the blocks' forward in: offload hooks if enabled for `model`."""
    return _OffloadToHost() if getattr(model, "offload_activations", False) else contextlib.nullcontext()
