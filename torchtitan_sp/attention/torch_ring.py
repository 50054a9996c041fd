"""Strategy `ring`: torch.distributed's own context-parallel ring attention.

torch's `_templated_ring_attention(_backward)` does the schedule (head-tail aware), the K/V rotation
(all-gather or all-to-all), the fp32 LSE merge and a backward that rotates K/V again, so every step's
gradient uses that step's own K/V. We call it directly from an autograd.Function instead of going
through the DTensor dispatcher: no DTensor wrapping, K/V travel with their Hkv heads (every block
kernel takes GQA natively), and the rotate/load-balance options are scoped to this module.

Packed documents: torch's ring knows only is_causal. With document ids, K/V are all-gathered one KV
head at a time instead (attention/allgather.py with heads_k_stride 1, the next head's gather
overlapping this one's attention) and each query piece of a document attends to its document's keys
on the unmasked kernels: the same bytes as the ring, no mask; two KV heads' full-sequence K/V are
alive (the one in use and the prefetched next), so that memory grows with S.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchtitan_sp.attention import torch_cp_compat as compat
from torchtitan_sp.attention.allgather import allgather_attention


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                rotate_method: str, load_balance: bool) -> torch.Tensor:
        with compat.ring_options(rotate_method, load_balance):
            out, lse = compat.templated_ring_attention(group, 2, compat.ring_block_fwd, q, k, v, is_causal=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = (group, rotate_method, load_balance)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, rotate_method, load_balance = ctx.ring
        with compat.ring_options(rotate_method, load_balance):
            dq, dk, dv = compat.templated_ring_attention_backward(
                group, 2, compat.ring_block_bwd, dout.contiguous(), "grad_out", q, k, v, out, lse, True)
        return dq, dk, dv, None, None, None


# Dynamo cannot trace torch's ring merger inside an autograd.Function (torch 2.13: "intermediate
# tensor 'lse' ... aliases an input or output"), so a compiled block runs the ring eagerly.
@torch.compiler.disable
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                   rotate_method: str, load_balance: bool) -> torch.Tensor:
    """Causal ring attention over `group`; the local sequence is in head-tail layout iff load_balance."""
    return _RingAttention.apply(q, k, v, group, rotate_method, load_balance)


class TorchRingAttention(nn.Module):
    """Drop-in for LocalAttention: q (B, H, S/P, D), k and v (B, Hkv, S/P, D) on each cp rank."""

    def __init__(self, group: dist.ProcessGroup, load_balance: bool, rotate_method: str = "allgather"):
        super().__init__()
        self.group, self.load_balance, self.rotate_method = group, load_balance, rotate_method

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if document_ids is not None:
            return allgather_attention(q, k, v, document_ids, self.group, self.load_balance, heads_k_stride=1)
        return ring_attention(q, k, v, self.group, self.rotate_method, self.load_balance)

    def extra_repr(self) -> str:
        return f"rotate_method={self.rotate_method}, load_balance={self.load_balance}"
