"""Strategy `usp` (Unified Sequence Parallel / LoongTrain): Ulysses inside, ring across.

The cp mesh of P ranks is viewed as r x u: cp rank p = g*u + i is Ulysses rank i of group g and ring
rank g of ring i. An all-to-all inside the Ulysses group gives each rank H/u heads over the tokens of
its group's u shards; torch's ring (strategy `ring`) then runs over the ring sub-group; a second
all-to-all returns to sequence shards.

Why the ring sees a valid layout: with head-tail over P ranks, group g holds chunks g*u .. g*u+u-1 and
their mirrors 2P-1-(g*u+i), i.e. blocks g and 2r-1-g of a 2r-block split -- exactly ring rank g's
head-tail shard over r ranks, once reordered (UlyssesExchange does that); without load balancing it
holds contiguous block g of r. So the ring's causal schedule applies unchanged. With packed documents
the ring part is the document-piece all-gather that strategy `ring` uses for them (torch_ring.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_sp.attention import torch_cp_compat as compat
from torchtitan_sp.attention.allgather import allgather_attention
from torchtitan_sp.attention.torch_ring import ring_attention
from torchtitan_sp.attention.ulysses import UlyssesExchange


class USPAttention(nn.Module):
    """Drop-in for LocalAttention over a cp mesh viewed as (ring r) x (ulysses u)."""

    def __init__(self, cp_mesh: DeviceMesh, ulysses_degree: int, load_balance: bool,
                 rotate_method: str = "allgather"):
        super().__init__()
        u = ulysses_degree
        r = cp_mesh.size() // u
        mesh = compat.unflatten_mesh(cp_mesh, (r, u), ("cp_ring", "cp_ulysses"))
        self.ring_group = mesh.get_group("cp_ring")
        self.exchange = UlyssesExchange(mesh.get_group("cp_ulysses"), ring_rank=mesh.get_local_rank("cp_ring"),
                                        ring_size=r, headtail=load_balance)
        self.load_balance, self.rotate_method = load_balance, rotate_method
        self.degrees = (u, r)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, docs = self.exchange.scatter_heads(q, k, v, document_ids)
        if docs is None:
            out = ring_attention(q, k, v, self.ring_group, self.rotate_method, self.load_balance)
        else:
            out = allgather_attention(q, k, v, docs, self.ring_group, self.load_balance, heads_k_stride=1)
        return self.exchange.gather_sequence(out)

    def extra_repr(self) -> str:
        u, r = self.degrees
        return f"ulysses={u}, ring={r}, rotate_method={self.rotate_method}, load_balance={self.load_balance}"
