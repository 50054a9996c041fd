"""Attention on the tokens this rank holds: the module that context-parallel strategies replace or wrap."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def document_causal_mask(q_docs: torch.Tensor, kv_docs: torch.Tensor,
                         q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, Sq, Skv) mask: same document and key position <= query position.

    Positions are global token indices (not RoPE positions), so the mask stays right after
    load balancing permutes tokens.
    """
    same = q_docs[:, :, None] == kv_docs[:, None, :]
    causal = q_pos[:, :, None] >= kv_pos[:, None, :]
    return (same & causal)[:, None]


_compiled_flex = None
_mask_cache: tuple[weakref.ref, object] | None = None


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            document_ids: torch.Tensor) -> torch.Tensor:
    """Document-causal attention with FlexAttention (GPU): only the blocks a document needs are
    computed, and no S x S mask is ever built. The BlockMask is built once per micro-batch (every
    layer receives the same document_ids tensor object) and reused while that tensor lives."""
    global _compiled_flex, _mask_cache
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    if _mask_cache is None or _mask_cache[0]() is not document_ids:
        docs = document_ids

        def mask_mod(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

        seq = docs.shape[1]
        _mask_cache = (weakref.ref(document_ids), create_block_mask(mask_mod, docs.shape[0], None, seq, seq, device=docs.device))
    return _compiled_flex(q, k, v, block_mask=_mask_cache[1], enable_gqa=q.shape[1] != k.shape[1])


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
