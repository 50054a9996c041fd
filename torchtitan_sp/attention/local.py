"""Attention on the tokens this rank holds: the module that context-parallel strategies replace or wrap."""

from __future__ import annotations

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


class LocalAttention(nn.Module):
    """Causal scaled-dot-product attention; q (B, H, S, D), k and v (B, Hkv, S, D) with H % Hkv == 0.

    With `document_ids` (B, S), tokens attend only within their own document (packed sequences).
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if document_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        idx = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)
        mask = document_causal_mask(document_ids, document_ids, idx, idx)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
