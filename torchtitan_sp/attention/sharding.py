"""How one sequence is laid out over the cp ranks, for every context-parallel strategy.

Head-tail ("zigzag") load balancing cuts the sequence into 2P chunks and gives rank r the chunks
r and 2P-1-r, so every rank does the same causal work. It is the layout torch's ring attention
assumes when its load balancing is on. Without it rank r holds the r-th contiguous chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def shard_indices(seq_len: int, cp_rank: int, cp_size: int, headtail: bool,
                  device: torch.device | None = None) -> torch.Tensor:
    """Global token indices held by `cp_rank`, in local order."""
    if headtail:
        if seq_len % (2 * cp_size):
            raise ValueError(f"seq_len {seq_len} is not divisible by 2 x cp = {2 * cp_size}")
        c = seq_len // (2 * cp_size)
        head = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
        tail = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
        return torch.cat([head, tail])
    if seq_len % cp_size:
        raise ValueError(f"seq_len {seq_len} is not divisible by cp = {cp_size}")
    c = seq_len // cp_size
    return torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)


def shard_sequence(x: torch.Tensor, cp_rank: int, cp_size: int, headtail: bool, dim: int = 1) -> torch.Tensor:
    """This rank's part of x along `dim` (the sequence dimension)."""
    idx = shard_indices(x.shape[dim], cp_rank, cp_size, headtail, x.device)
    return x.index_select(dim, idx).contiguous()


def unshard_sequence(parts: list[torch.Tensor], headtail: bool, dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence given every rank's part (rank order)."""
    cp_size = len(parts)
    seq_len = sum(p.shape[dim] for p in parts)
    order = torch.cat([shard_indices(seq_len, r, cp_size, headtail) for r in range(cp_size)])
    full = torch.cat(parts, dim=dim)
    return full.index_select(dim, torch.argsort(order).to(full.device))
