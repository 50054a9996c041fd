"""Count the bytes each rank sends in collectives, by intercepting the collective ops themselves.

CommDebugMode counts collective calls but not bytes, so this is a small TorchDispatchMode over the
same ops: functional collectives (`_c10d_functional.*`, what funcol and torch's ring use) and c10d
ops (`c10d.*`, what torch.distributed.* calls). Bytes sent per rank, by the usual algorithms:
all-gather: input * (n-1); reduce-scatter: input * (n-1)/n; all-to-all: everything not kept for
oneself; all-reduce: 2 * input * (n-1)/n.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.utils._python_dispatch import TorchDispatchMode

_funcol = torch.ops._c10d_functional
_c10d = torch.ops.c10d


@dataclass
class CommRecord:
    op: str
    group_size: int
    bytes_sent: int


def _group(arg: Any) -> dist.ProcessGroup:
    if isinstance(arg, str):
        return c10d._resolve_process_group(arg)
    return dist.ProcessGroup.unbox(arg)


def _a2a_sent(x: torch.Tensor, input_splits: list[int] | None, pg: dist.ProcessGroup) -> int:
    n, rank = pg.size(), pg.rank()
    row = x.numel() // max(x.shape[0], 1) * x.element_size() if x.dim() else x.element_size()
    if not input_splits:
        return x.numel() * x.element_size() * (n - 1) // n
    return (sum(input_splits) - input_splits[rank]) * row


def _sent(func: Any, args: tuple) -> tuple[int, dist.ProcessGroup] | None:
    """(bytes sent by this rank, group) for a collective op, None for anything else."""
    packet = func.overloadpacket
    if packet is _funcol.all_gather_into_tensor:
        pg = _group(args[2])
        return args[0].numel() * args[0].element_size() * (pg.size() - 1), pg
    if packet is _funcol.reduce_scatter_tensor:
        pg = _group(args[3])
        return args[0].numel() * args[0].element_size() * (pg.size() - 1) // pg.size(), pg
    if packet is _funcol.all_to_all_single:
        pg = _group(args[3])
        return _a2a_sent(args[0], args[2], pg), pg
    if packet is _funcol.all_reduce:
        pg = _group(args[2])
        return 2 * args[0].numel() * args[0].element_size() * (pg.size() - 1) // pg.size(), pg
    if packet is _c10d._allgather_base_:
        pg = _group(args[2])
        return args[1].numel() * args[1].element_size() * (pg.size() - 1), pg
    if packet is _c10d._reduce_scatter_base_:
        pg = _group(args[2])
        return args[1].numel() * args[1].element_size() * (pg.size() - 1) // pg.size(), pg
    if packet is _c10d.alltoall_base_:
        pg = _group(args[2])
        return _a2a_sent(args[1], args[4], pg), pg
    return None


class CommCounter(TorchDispatchMode):
    """with CommCounter() as c: ...; then c.total_bytes(), c.bytes_by_op(), c.records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[CommRecord] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        hit = _sent(func, args)
        if hit is not None:
            self.records.append(CommRecord(str(func.overloadpacket), hit[1].size(), hit[0]))
        return func(*args, **(kwargs or {}))

    def total_bytes(self) -> int:
        return sum(r.bytes_sent for r in self.records)

    def bytes_by_op(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            out[r.op] += r.bytes_sent
        return dict(out)


def formula_elements(strategy: str, dim: int, kv_dim: int, seq_len: int, cp: int, ulysses: int = 1) -> float:
    """Forward elements sent per rank per layer (d = dim, d_kv = kv_dim, S = seq_len, P = cp), as in
    README's context-parallelism table: ring/allgather 2 d_kv S (P-1)/P; ulysses (2d + 2d_kv) S/P (P-1)/P;
    usp that over u plus the ring's K/V over r = P/u: 2 d_kv S (r-1)/(r u).

    For Ulysses degrees above the KV head count the KV heads are replicated before the all-to-all:
    pass kv_dim = u * head_dim then.
    """
    if strategy in ("ring", "allgather"):
        return 2 * kv_dim * seq_len * (cp - 1) / cp
    if strategy == "ulysses":
        return (2 * dim + 2 * kv_dim) * seq_len / cp * (cp - 1) / cp
    if strategy == "usp":
        u, r = ulysses, cp // ulysses
        return (2 * dim + 2 * kv_dim) * seq_len / cp * (u - 1) / u + 2 * kv_dim * seq_len * (r - 1) / (r * u)
    raise ValueError(strategy)
