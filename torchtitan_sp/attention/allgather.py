"""Strategy `allgather` (ring-flash-attn "llama3" / Axolotl heads_k_stride): gather K/V, not a ring.

For each group of `heads_k_stride` KV heads, K and V are all-gathered over cp (the next group's gather
is issued before this group's attention, to overlap), and the query heads that share those KV heads
attend to the keys their global token indices (and documents) allow. Two strides' gathered K/V are
alive at a time (the one in use and the prefetched next), each stride x full S x head_dim: memory is
bounded by the stride in heads but grows with the sequence. Backward gathers again and
reduce-scatters dK/dV (an fp32 full-sequence buffer per stride).

Each contiguous run of local queries [g, g+c) sees keys [0, g+c) as two kernel blocks merged by
log-sum-exp: keys before g in full, keys [g, g+c) causal. Packed documents (contiguous runs of equal
ids) cut the runs at document starts: a piece [a, e) of a document that starts at f sees keys [f, e)
the same way (keys [f, a) in full, [a, e) causal). No mask is ever built, and every block runs on the
fast unmasked kernels (cuDNN / flash on GPU). Strategies `ring` and `usp` use this for packed documents.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from torchtitan_sp.attention import torch_cp_compat as compat
from torchtitan_sp.attention.local import PerMicroBatch
from torchtitan_sp.attention.ulysses import exchange_order, gather_sequence


def _runs(rank: int, cp_size: int, local_len: int, headtail: bool) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of each contiguous run of this rank's tokens."""
    if not headtail:
        return [(0, rank * local_len, local_len)]
    c = local_len // 2
    return [(0, rank * c, c), (c, (2 * cp_size - 1 - rank) * c, c)]


# (batch rows, local start, global start, length, first key): queries [global start, + length)
# attend keys [first key, global start) in full and [global start, + length) causally.
Piece = tuple[slice, int, int, int, int]


def _pieces(runs: list[tuple[int, int, int]], doc_starts: list[list[int]] | None) -> list[Piece]:
    """The runs as they are (every key from 0), or per batch row cut at its document starts."""
    if doc_starts is None:
        return [(slice(None), start, gstart, n, 0) for start, gstart, n in runs]
    pieces = []
    for row, starts in enumerate(doc_starts):  # sorted, starting with 0
        for start, gstart, n in runs:
            cuts = [gstart, *starts[bisect.bisect_right(starts, gstart):bisect.bisect_left(starts, gstart + n)],
                    gstart + n]
            for a, e in zip(cuts, cuts[1:]):
                first = starts[bisect.bisect_right(starts, a) - 1]  # the start of a's document
                pieces.append((slice(row, row + 1), start + a - gstart, a, e - a, first))
    return pieces


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor,
           l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint keys, in fp32."""
    lse = torch.logaddexp(l1, l2)
    out = o1.float() * torch.exp(l1 - lse)[..., None] + o2.float() * torch.exp(l2 - lse)[..., None]
    return out.to(o1.dtype), lse


class _Gathered:
    """All-gathers one KV-head stride of k and v and returns it in natural token order."""

    def __init__(self, group: dist.ProcessGroup, headtail: bool, seq_len: int):
        self.group, self.cp_size = group, dist.get_world_size(group)
        # (rank, local start, global start, length) of every contiguous run of every rank's tokens:
        # one copy per run moves between rank-major (collective) and natural (attention) order.
        self.runs = [(r, *run) for r in range(self.cp_size)
                     for run in _runs(r, self.cp_size, seq_len // self.cp_size, headtail)]

    def strides(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int
                ) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
        """(query heads, KV heads, gathered K, gathered V) per stride of KV heads; the next stride's
        all-gather is issued before this one is used, so communication overlaps compute."""
        q_per_kv = q.shape[1] // k.shape[1]
        groups = [slice(h, h + stride) for h in range(0, k.shape[1], stride)]
        pending = self.issue(k, v, groups[0])
        for i, kv_heads in enumerate(groups):
            kf, vf = self.wait(pending)
            if i + 1 < len(groups):
                pending = self.issue(k, v, groups[i + 1])
            yield slice(kv_heads.start * q_per_kv, kv_heads.stop * q_per_kv), kv_heads, kf, vf

    def issue(self, k: torch.Tensor, v: torch.Tensor, heads: slice) -> torch.Tensor:
        return compat.all_gather_single(torch.stack([k[:, heads], v[:, heads]]).contiguous(), 0, self.group)

    def wait(self, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = funcol.wait_tensor(pending)  # (P*2, B, st, S_l, D), rank-major
        p, (_, b, st, s_l, d) = self.cp_size, full.shape
        full = full.view(p, 2, b, st, s_l, d)
        kv = full.new_empty(2, b, st, p * s_l, d)
        for rank, start, gstart, n in self.runs:
            kv[:, :, :, gstart:gstart + n] = full[rank, :, :, :, start:start + n]
        k, v = kv.unbind(0)
        return k, v

    def reduce_scatter(self, dkv: torch.Tensor) -> torch.Tensor:
        """(2, B, st, S, D) full-sequence dK/dV summed over ranks -> this rank's (2, B, st, S_l, D)."""
        send = dkv.new_empty(self.cp_size, *dkv.shape[:3], dkv.shape[3] // self.cp_size, dkv.shape[4])
        for rank, start, gstart, n in self.runs:
            send[rank, :, :, :, start:start + n] = dkv[:, :, :, gstart:gstart + n]
        return funcol.wait_tensor(compat.reduce_scatter_single(send.flatten(0, 1), "sum", 0, self.group))


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_starts: list[list[int]] | None,
                group: dist.ProcessGroup, headtail: bool, stride: int) -> torch.Tensor:
        rank, cp_size = dist.get_rank(group), dist.get_world_size(group)
        gathered = _Gathered(group, headtail, q.shape[2] * cp_size)
        pieces = _pieces(_runs(rank, cp_size, q.shape[2], headtail), doc_starts)
        any_length = doc_starts is not None  # pieces cut at document starts: sizes vary per batch
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for qh, _, kf, vf in gathered.strides(q, k, v, stride):
            for rows, start, gstart, n, first in pieces:
                qc = q[rows, qh, start:start + n]
                o, l = compat.attn_fwd(qc, kf[rows, :, gstart:gstart + n], vf[rows, :, gstart:gstart + n], True,
                                       any_length)
                if first < gstart:
                    o, l = _merge(o, l, *compat.attn_fwd(qc, kf[rows, :, first:gstart], vf[rows, :, first:gstart],
                                                         False, any_length))
                out[rows, qh, start:start + n] = o
                lse[rows, qh, start:start + n] = l
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (group, headtail, stride, pieces, any_length)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, headtail, stride, pieces, any_length = ctx.setup
        gathered = _Gathered(group, headtail, q.shape[2] * dist.get_world_size(group))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for qh, kv_heads, kf, vf in gathered.strides(q, k, v, stride):
            # fp32 accumulation: several query pieces write into the same early keys.
            dkv = torch.zeros((2, *kf.shape), dtype=torch.float32, device=q.device)
            dkf, dvf = dkv.unbind(0)
            for rows, start, gstart, n, first in pieces:
                mine = (rows, qh, slice(start, start + n))
                qc, doc, oc, lc = q[mine], dout[mine], out[mine], lse[mine]
                diag = slice(gstart, gstart + n)
                dqc, dkc, dvc = compat.attn_bwd(doc, qc, kf[rows, :, diag], vf[rows, :, diag], oc, lc, True,
                                                any_length)
                dkf[rows, :, diag] += dkc
                dvf[rows, :, diag] += dvc
                if first < gstart:
                    before = slice(first, gstart)
                    dqp, dkp, dvp = compat.attn_bwd(doc, qc, kf[rows, :, before], vf[rows, :, before], oc, lc, False,
                                                    any_length)
                    dqc = dqc + dqp
                    dkf[rows, :, before] += dkp
                    dvf[rows, :, before] += dvp
                dq[mine] = dqc
            dk[:, kv_heads], dv[:, kv_heads] = gathered.reduce_scatter(dkv).to(k.dtype).unbind(0)
        return dq, dk, dv, None, None, None, None


# Shared by every layer: one gather and one host sync per micro-batch, not per layer.
_document_starts = PerMicroBatch()


def document_starts(document_ids: torch.Tensor, group: dist.ProcessGroup, load_balance: bool) -> list[list[int]]:
    """Per batch row, the global token indices where a document starts (0 first), from every cp
    rank's shard of the document ids."""
    def starts() -> list[list[int]]:
        docs = gather_sequence(document_ids, group)
        if load_balance:  # rank-major head-tail shards -> natural token order
            cp = dist.get_world_size(group)
            docs = docs.index_select(1, exchange_order(docs.shape[1], cp, 0, 1, True, docs.device)[0])
        change = torch.ones_like(docs, dtype=torch.bool)
        change[:, 1:] = docs[:, 1:] != docs[:, :-1]
        return [row.nonzero().flatten().tolist() for row in change]
    return _document_starts.get(document_ids, None, starts)


# Runs eagerly inside compiled blocks: tracing the Function gains nothing (its work is aten
# kernels and collectives) and costs long compiles.
@torch.compiler.disable
def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None,
                        group: dist.ProcessGroup, load_balance: bool, heads_k_stride: int) -> torch.Tensor:
    """Causal (document-causal with ids) attention of this rank's queries over the whole sequence,
    gathering `heads_k_stride` KV heads at a time over `group`."""
    starts = None if document_ids is None else document_starts(document_ids, group, load_balance)
    return _AllGatherAttention.apply(q, k, v, starts, group, load_balance, heads_k_stride)


class AllGatherAttention(nn.Module):
    """Drop-in for LocalAttention: q (B, H, S/P, D), k and v (B, Hkv, S/P, D) on each cp rank."""

    def __init__(self, group: dist.ProcessGroup, load_balance: bool, heads_k_stride: int = 1):
        super().__init__()
        self.group, self.load_balance, self.heads_k_stride = group, load_balance, heads_k_stride

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if k.shape[1] % self.heads_k_stride:
            raise ValueError(f"parallelism.heads_k_stride: {self.heads_k_stride} does not divide "
                             f"the {k.shape[1]} KV heads")
        return allgather_attention(q, k, v, document_ids, self.group, self.load_balance, self.heads_k_stride)

    def extra_repr(self) -> str:
        return f"heads_k_stride={self.heads_k_stride}, load_balance={self.load_balance}"
