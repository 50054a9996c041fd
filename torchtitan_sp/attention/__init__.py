"""Context-parallel attention: one module per strategy, each a drop-in for `Attention.inner_attention`.

Every strategy takes this rank's q (B, H, S/P, D) and k, v (B, Hkv, S/P, D) laid out by
`sharding.shard_indices` (head-tail iff load_balance) and returns the causal attention output of
those query tokens over the whole sequence, (B, H, S/P, D).

    ring       torch's ring attention (K/V rotated)
    ulysses    all-to-all to head shards, local attention, all-to-all back
    usp        Ulysses inside groups of u ranks x torch ring across the cp/u groups
    allgather  K/V all-gathered heads_k_stride KV heads at a time

All take packed documents' ids and attend document-causally (ring and usp through allgather's
document pieces, since torch's ring knows only is_causal).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

STRATEGIES = ("ring", "ulysses", "usp", "allgather")
ROTATE_METHODS = ("allgather", "alltoall")
# torch's ring takes no mask: with packed documents these run as allgather, one KV head per stride.
GATHERED_FOR_DOCUMENTS = ("ring", "usp")


def _check_heads(key: str, degree: int, n_heads: int, n_kv_heads: int, what: str) -> None:
    if n_heads % degree:
        raise ValueError(f"{key}: {what} {degree} must divide n_heads {n_heads}")
    if n_kv_heads % degree and degree % n_kv_heads:
        raise ValueError(f"{key}: {what} {degree} and n_kv_heads {n_kv_heads} must divide one another "
                         f"(KV heads are replicated when {what} > n_kv_heads)")


def check_cp_attention(strategy: str, cp_degree: int, ulysses_degree: int, heads_k_stride: int,
                       n_heads: int, n_kv_heads: int, rotate_method: str = "allgather") -> None:
    """Raise ValueError (one line naming the config key) for any combination that cannot work.

    Called before any process group exists. Every strategy supports both sequence layouts, so the
    load balancer is no argument (its seq_len rule, 2*cp or cp, is checked in ParallelDims.validate).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"parallelism.context_parallel_strategy: {strategy!r} is not one of {' | '.join(STRATEGIES)}")
    if rotate_method not in ROTATE_METHODS:
        raise ValueError(f"parallelism.context_parallel_rotate_method: {rotate_method!r} is not one of "
                         f"{' | '.join(ROTATE_METHODS)}")
    if cp_degree < 1:
        raise ValueError(f"parallelism.context_parallel_degree: must be >= 1, got {cp_degree}")
    if n_heads < 1 or n_kv_heads < 1:
        raise ValueError(f"model: {n_heads} query / {n_kv_heads} KV heads per rank; tensor parallelism "
                         f"cannot split the heads below one per rank")
    if n_heads % n_kv_heads:
        raise ValueError(f"model: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    if strategy != "usp" and ulysses_degree != 1:
        raise ValueError(f"parallelism.context_parallel_ulysses_degree: {ulysses_degree} applies to "
                         f"context_parallel_strategy 'usp' only (strategy is {strategy!r}); leave it at 1")
    if strategy != "allgather" and heads_k_stride != 1:
        raise ValueError(f"parallelism.heads_k_stride: {heads_k_stride} applies to context_parallel_strategy "
                         f"'allgather' only (strategy is {strategy!r}); leave it at 1")
    if cp_degree == 1:
        return  # no context parallelism: plain local attention
    if strategy == "ulysses":
        _check_heads("parallelism.context_parallel_degree", cp_degree, n_heads, n_kv_heads,
                     "ulysses degree (= context_parallel_degree)")
    elif strategy == "usp":
        if ulysses_degree < 1 or cp_degree % ulysses_degree:
            raise ValueError(f"parallelism.context_parallel_ulysses_degree: {ulysses_degree} must divide "
                             f"context_parallel_degree {cp_degree}")
        _check_heads("parallelism.context_parallel_ulysses_degree", ulysses_degree, n_heads, n_kv_heads,
                     "ulysses degree")
    elif strategy == "allgather":
        if heads_k_stride < 1 or n_kv_heads % heads_k_stride:
            raise ValueError(f"parallelism.heads_k_stride: {heads_k_stride} must divide n_kv_heads {n_kv_heads}")


def build_cp_attention(strategy: str, cp_mesh: DeviceMesh, *, load_balance: bool,
                       rotate_method: str = "allgather", ulysses_degree: int = 1, heads_k_stride: int = 1,
                       n_heads: int, n_kv_heads: int) -> nn.Module:
    """The inner-attention module of `strategy` over the 1-D cp mesh (checked like the config).

    n_heads / n_kv_heads are the heads this rank's attention sees (after tensor parallelism).
    """
    check_cp_attention(strategy, cp_mesh.size(), ulysses_degree, heads_k_stride, n_heads, n_kv_heads,
                       rotate_method=rotate_method)
    group = cp_mesh.get_group()
    # Imported here so that importing the model (attention.local) does not pull in torch's private CP.
    if strategy == "ring":
        from torchtitan_sp.attention.torch_ring import TorchRingAttention
        return TorchRingAttention(group, load_balance, rotate_method)
    if strategy == "ulysses":
        from torchtitan_sp.attention.ulysses import UlyssesAttention
        return UlyssesAttention(group, load_balance)
    if strategy == "usp":
        from torchtitan_sp.attention.usp import USPAttention
        return USPAttention(cp_mesh, ulysses_degree, load_balance, rotate_method)
    from torchtitan_sp.attention.allgather import AllGatherAttention
    return AllGatherAttention(group, load_balance, heads_k_stride)
