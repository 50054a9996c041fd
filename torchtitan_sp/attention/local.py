"""Attention on the tokens this rank holds: the module that context-parallel strategies replace or wrap."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def document_causal_mask(q_docs: torch.Tensor, kv_docs: torch.Tensor,
                         q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, Sq, Skv) mask: same document and key position <= query position.

    Positions are global token indices (not RoPE positions), so the mask stays right after
    load balancing permutes tokens.
    """
    same = q_docs[:, :, None] == kv_docs[:, None, :]
    causal = q_pos[:, :, None] >= kv_pos[:, None, :]
    return (same & causal)[:, None]


class PerMicroBatch:
    """One value derived from a micro-batch's document ids, reused while calls pass that same ids
    tensor and held until a call with other ids replaces it (a BlockMask's mask_mod captures the ids,
    so the cache keeps ids and mask alive until the next micro-batch). Every layer receives the same
    tensor object, so the work (a gather, a host sync, a BlockMask) runs for the first layer only.
    Python state: call it from frames kept out of compiled graphs."""

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref, Hashable, Any] | None = None

    def get(self, document_ids: torch.Tensor, key: Hashable, make: Callable[[], Any]) -> Any:
        if self._entry is None or self._entry[0]() is not document_ids or self._entry[1] != key:
            self._entry = (weakref.ref(document_ids), key, make())
        return self._entry[2]


_compiled: dict[str, Callable] = {}  # flex_attention and create_block_mask, compiled on first use
_block_masks = PerMicroBatch()


def document_block_mask(document_ids: torch.Tensor) -> "BlockMask":
    """The document-causal BlockMask of (B, S) ids (same document, key position <= query position).

    create_block_mask is compiled: eager, it materializes the dense (S x S) mask first (at 32K tokens
    10.5 GB and 15 s on CPU, at 128K beyond any GPU); compiled, mask_mod fuses into the block
    reduction (0.4 GB, 0.1 s; scripts/bench_block_mask.py)."""
    from torch.nn.attention.flex_attention import create_block_mask
    if "create_block_mask" not in _compiled:
        _compiled["create_block_mask"] = torch.compile(create_block_mask)

    def mask_mod(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)

    batch, seq = document_ids.shape
    return _compiled["create_block_mask"](mask_mod, batch, None, seq, seq, device=document_ids.device)


# Python-side caches, so this frame stays out of compiled blocks; the compiled calls inside it still compile.
@torch.compiler.disable(recursive=False)
def _flex_and_mask(document_ids: torch.Tensor) -> tuple[Callable, "BlockMask"]:
    """Compiled flex_attention and this micro-batch's BlockMask: built once, for the first layer
    (every layer receives the same document_ids tensor object), reused while that tensor lives."""
    from torch.nn.attention.flex_attention import flex_attention
    if "flex_attention" not in _compiled:
        _compiled["flex_attention"] = torch.compile(flex_attention)
    return _compiled["flex_attention"], _block_masks.get(document_ids, None, lambda: document_block_mask(document_ids))


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            document_ids: torch.Tensor) -> torch.Tensor:
    """Document-causal attention with FlexAttention (GPU): only the blocks a document needs are
    computed, and no S x S mask is ever built."""
    flex, block_mask = _flex_and_mask(document_ids)
    return flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


class LocalAttention(nn.Module):
    """Causal scaled-dot-product attention; q (B, H, S, D), k and v (B, Hkv, S, D) with H % Hkv == 0.

    With `document_ids` (B, S), tokens attend only within their own document (packed sequences):
    FlexAttention with a document BlockMask on GPU; on CPU (where FlexAttention has no backward)
    SDPA with an explicit mask.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if document_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if q.is_cuda:
            return flex_document_attention(q, k, v, document_ids)
        idx = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)
        mask = document_causal_mask(document_ids, document_ids, idx, idx)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
