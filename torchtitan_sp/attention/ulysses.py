"""Strategy `ulysses` (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards and back.

Each of the u ranks sends head group j of its q, k, v to rank j and receives every rank's tokens for
its own heads; it then runs ordinary causal attention on the full sequence and a second all-to-all
returns the output to sequence shards. Both all-to-alls are autograd-aware (funcol), so backward is
the same two exchanges in reverse.

The received sequence is the ranks' shards concatenated (a permutation of the tokens when the layout
is head-tail), so it is reordered to the order the inner attention expects before attending and
back afterwards. GQA: the KV all-to-all moves Hkv heads; when u > Hkv each KV head is first repeated
u / Hkv times so that every rank receives one whole KV head for its query heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from torchtitan_sp.attention import torch_cp_compat as compat
from torchtitan_sp.attention.local import LocalAttention, PerMicroBatch
from torchtitan_sp.attention.sharding import shard_indices


def layout_indices(seq_len: int, ranks: range, cp_size: int, headtail: bool,
                   device: torch.device | None = None) -> torch.Tensor:
    """Global token indices of the given cp ranks' shards, concatenated in rank order."""
    return torch.cat([shard_indices(seq_len, r, cp_size, headtail, device) for r in ranks])


def reorder_index(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """p such that src[p] == dst, for two orderings of the same set of token indices."""
    return torch.argsort(src)[torch.argsort(torch.argsort(dst))]


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, H, S_l, D) sequence shard -> (B, H/u, u*S_l, D): this rank's heads, all u ranks' tokens
    (in rank order)."""
    u = dist.get_world_size(group)
    b, h, s, d = x.shape
    send = x.unflatten(1, (u, h // u)).movedim(1, 0).contiguous()  # (u, B, H/u, S_l, D), by destination
    recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(send, None, None, group))
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * s, d)  # sources along the sequence


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of seq_to_heads: (B, H/u, u*S_l, D) -> (B, H, S_l, D)."""
    u = dist.get_world_size(group)
    b, hl, s, d = x.shape
    send = x.unflatten(2, (u, s // u)).permute(2, 0, 1, 3, 4).contiguous()  # (u, B, H/u, S_l, D)
    recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(send, None, None, group))
    return recv.movedim(0, 1).reshape(b, u * hl, s // u, d)  # source rank j held heads group j


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, S_l) per rank -> (B, u*S_l), shards concatenated in rank order (no gradient)."""
    u = dist.get_world_size(group)
    full = funcol.wait_tensor(compat.all_gather_single(x.contiguous(), 0, group))  # (u*B, S_l)
    return full.unflatten(0, (u, x.shape[0])).movedim(0, 1).reshape(x.shape[0], -1)


def exchange_order(seq_len: int, u: int, ring_rank: int, ring_size: int, headtail: bool,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token reorderings around the all-to-all of Ulysses group `ring_rank` (cp ranks
    ring_rank*u ... ring_rank*u + u-1 of P = u*ring_size).

    After the exchange a rank holds the group's shards concatenated. Returns (to_target, from_target):
    index_select with to_target gives shard `ring_rank` of the same layout over `ring_size` ranks
    (the whole sequence in natural order when ring_size == 1); from_target undoes it.
    """
    gathered = layout_indices(seq_len, range(ring_rank * u, (ring_rank + 1) * u), u * ring_size, headtail, device)
    target = shard_indices(seq_len, ring_rank, ring_size, headtail, device)
    to_target = reorder_index(gathered, target)
    return to_target, torch.argsort(to_target)


_scattered_documents = PerMicroBatch()


class UlyssesExchange:
    """The sequence <-> head exchange of one Ulysses group, shared by `ulysses` and `usp`."""

    def __init__(self, group: dist.ProcessGroup, ring_rank: int, ring_size: int, headtail: bool):
        self.group, self.ring_rank, self.ring_size, self.headtail = group, ring_rank, ring_size, headtail
        self.u = dist.get_world_size(group)

    def _reorder(self, x: torch.Tensor, local_len: int, dim: int, inverse: bool = False) -> torch.Tensor:
        """Gathered (rank-concatenated) tokens along `dim` -> target order, or back with inverse."""
        if not self.headtail:  # contiguous shards of one group concatenate in target order already
            return x
        to_target, from_target = exchange_order(local_len * self.u * self.ring_size, self.u, self.ring_rank,
                                                self.ring_size, self.headtail, x.device)
        return x.index_select(dim, from_target if inverse else to_target)

    def scatter_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      document_ids: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sequence-sharded q, k, v (and document ids) -> head-sharded ones over the target tokens."""
        u, n_heads, n_kv, local_len = self.u, q.shape[1], k.shape[1], q.shape[2]
        kv_heads = max(n_kv, u)  # u > Hkv: replicate so every rank gets one whole KV head
        if n_heads % u or kv_heads % u or kv_heads % n_kv:
            raise ValueError(f"ulysses degree {u} needs n_heads ({n_heads}) divisible by it and "
                             f"n_kv_heads ({n_kv}) to divide or be divisible by it")
        k = k.repeat_interleave(kv_heads // n_kv, dim=1)
        v = v.repeat_interleave(kv_heads // n_kv, dim=1)
        # One all-to-all for q, k and v: per destination, its query heads then its KV heads.
        qkv = torch.cat([t.unflatten(1, (u, -1)) for t in (q, k, v)], dim=2).flatten(1, 2)
        qkv = self._reorder(seq_to_heads(qkv, self.group), local_len, dim=2)
        q, k, v = qkv.split([n_heads // u, kv_heads // u, kv_heads // u], dim=1)
        docs = None if document_ids is None else self._scatter_documents(document_ids)
        return q, k, v, docs

    @torch.compiler.disable  # Python-side cache: keep it out of compiled blocks
    def _scatter_documents(self, document_ids: torch.Tensor) -> torch.Tensor:
        """This Ulysses group's document ids over the target tokens: gathered once per micro-batch
        and the same tensor object for every layer, so the inner attention's own per-micro-batch
        caches (FlexAttention BlockMask, document starts) hit from the second layer on."""
        return _scattered_documents.get(
            document_ids, (self.u, self.ring_rank, self.ring_size, self.headtail),
            lambda: self._reorder(gather_sequence(document_ids, self.group), document_ids.shape[1], dim=1))

    def gather_sequence(self, out: torch.Tensor) -> torch.Tensor:
        """Head-sharded output over the target tokens -> this rank's sequence shard, all heads."""
        return heads_to_seq(self._reorder(out, out.shape[2] // self.u, dim=2, inverse=True), self.group)


class UlyssesAttention(nn.Module):
    """Drop-in for LocalAttention; the whole cp group is one Ulysses group of size u = P."""

    def __init__(self, group: dist.ProcessGroup, load_balance: bool):
        super().__init__()
        self.exchange = UlyssesExchange(group, ring_rank=0, ring_size=1, headtail=load_balance)
        self.inner = LocalAttention()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, docs = self.exchange.scatter_heads(q, k, v, document_ids)
        return self.exchange.gather_sequence(self.inner(q, k, v, docs))
