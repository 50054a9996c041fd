"""Test oracles, written plainly on one process: full attention with an explicit mask, and ring
attention with a log-sum-exp merge (forward and hand-written backward) as the library rings compute it."""

from __future__ import annotations

import torch

from torchtitan_sp.attention.sharding import shard_indices


def attention_mask(seq_len: int, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, 1, S, S) boolean: causal, and block-diagonal over documents when ids are given."""
    pos = torch.arange(seq_len)
    mask = (pos[:, None] >= pos[None, :])[None, None]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v over the whole sequence; KV heads repeated for GQA."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~attention_mask(q.shape[2], document_ids), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _block(q, k, v, q_pos, kv_pos):
    """Scores, out and lse of one (query shard, KV shard) block under the causal mask of global positions."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(q_pos[:, None] < kv_pos[None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on rows that see nothing of this block
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                   cp_size: int, headtail: bool) -> tuple[torch.Tensor, ...]:
    """Simulated causal ring over cp_size ranks (MHA, fp32): returns out, dq, dk, dv, all unsharded.

    Rank r, step i: queries of shard r meet K/V of shard (r - i) mod P. Forward merges (out, lse) pairs
    in fp32; backward recomputes each block's probabilities from the final lse and sends dK/dV home.
    """
    seq_len = q.shape[2]
    pos = [shard_indices(seq_len, r, cp_size, headtail) for r in range(cp_size)]
    take = lambda t, r: t[:, :, pos[r]]  # noqa: E731
    out, dq, dk, dv = (torch.zeros_like(t) for t in (q, q, k, v))
    for r in range(cp_size):
        qr = take(q, r)
        o = torch.zeros_like(qr)
        lse = torch.full(qr.shape[:3], float("-inf"))
        for i in range(cp_size):
            src = (r - i) % cp_size
            ob, lb = _block(qr, take(k, src), take(v, src), pos[r], pos[src])
            new = torch.logaddexp(lse, lb)
            wa, wb = torch.exp(lse - new).nan_to_num(0.0), torch.exp(lb - new).nan_to_num(0.0)
            o, lse = o * wa[..., None] + ob * wb[..., None], new
        out[:, :, pos[r]] = o
        do = take(dout, r)
        delta = (do * o).sum(-1, keepdim=True)  # D_i = rowsum(dO * O)
        for i in range(cp_size):
            src = (r - i) % cp_size
            kb, vb = take(k, src), take(v, src)
            s = (qr @ kb.transpose(-1, -2)) * q.shape[-1] ** -0.5
            s = s.masked_fill(pos[r][:, None] < pos[src][None, :], float("-inf"))
            p = torch.exp(s - lse[..., None])
            ds = p * (do @ vb.transpose(-1, -2) - delta) * q.shape[-1] ** -0.5
            dq[:, :, pos[r]] += ds @ kb
            dk[:, :, pos[src]] += ds.transpose(-1, -2) @ qr
            dv[:, :, pos[src]] += p.transpose(-1, -2) @ do
    return out, dq, dk, dv
