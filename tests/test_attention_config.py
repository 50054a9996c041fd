"""check_cp_attention: every configuration that cannot work is rejected with one line naming the key."""

from __future__ import annotations

import pytest

from torchtitan_sp.attention import check_cp_attention

BASE = dict(strategy="ring", cp_degree=4, ulysses_degree=1, heads_k_stride=1, n_heads=32, n_kv_heads=8)


def _check(**overrides) -> None:
    check_cp_attention(**{**BASE, **overrides})


@pytest.mark.parametrize("overrides", [
    {},
    dict(strategy="ring", rotate_method="alltoall"),
    dict(strategy="ulysses", cp_degree=8),
    dict(strategy="ulysses", cp_degree=16),  # Llama-3-8B: 8 KV heads replicated to 16
    dict(strategy="usp", cp_degree=8, ulysses_degree=2),
    dict(strategy="usp", cp_degree=16, ulysses_degree=16),
    dict(strategy="allgather", heads_k_stride=8),
], ids=str)
def test_accepted(overrides: dict) -> None:
    _check(**overrides)


REJECTED = [
    (dict(strategy="zigzag"),
     "parallelism.context_parallel_strategy: 'zigzag' is not one of ring | ulysses | usp | allgather"),
    (dict(rotate_method="p2p"), "parallelism.context_parallel_rotate_method: 'p2p' is not one of allgather | alltoall"),
    (dict(cp_degree=0), "parallelism.context_parallel_degree: must be >= 1, got 0"),
    (dict(n_heads=32, n_kv_heads=6), "model: n_heads 32 is not a multiple of n_kv_heads 6"),
    (dict(n_heads=2, n_kv_heads=0), "model: 2 query / 0 KV heads per rank; tensor parallelism cannot split"),
    (dict(ulysses_degree=2), "parallelism.context_parallel_ulysses_degree: 2 applies to context_parallel_strategy "
                             "'usp' only (strategy is 'ring'); leave it at 1"),
    (dict(strategy="ulysses", heads_k_stride=2), "parallelism.heads_k_stride: 2 applies to context_parallel_strategy "
                                                 "'allgather' only (strategy is 'ulysses'); leave it at 1"),
    (dict(strategy="ulysses", cp_degree=3, n_heads=32), "parallelism.context_parallel_degree: ulysses degree "
                                                        "(= context_parallel_degree) 3 must divide n_heads 32"),
    (dict(strategy="ulysses", cp_degree=4, n_heads=24, n_kv_heads=6),
     "parallelism.context_parallel_degree: ulysses degree (= context_parallel_degree) 4 and n_kv_heads 6 must "
     "divide one another (KV heads are replicated when ulysses degree (= context_parallel_degree) > n_kv_heads)"),
    (dict(strategy="usp", cp_degree=8, ulysses_degree=3), "parallelism.context_parallel_ulysses_degree: 3 must "
                                                          "divide context_parallel_degree 8"),
    (dict(strategy="usp", cp_degree=8, ulysses_degree=0), "parallelism.context_parallel_ulysses_degree: 0 must "
                                                          "divide context_parallel_degree 8"),
    (dict(strategy="usp", cp_degree=12, ulysses_degree=12, n_heads=32), "parallelism.context_parallel_ulysses_degree: "
                                                                         "ulysses degree 12 must divide n_heads 32"),
    (dict(strategy="usp", cp_degree=8, ulysses_degree=4, n_heads=24, n_kv_heads=6),
     "parallelism.context_parallel_ulysses_degree: ulysses degree 4 and n_kv_heads 6 must divide one another"),
    (dict(strategy="allgather", heads_k_stride=3), "parallelism.heads_k_stride: 3 must divide n_kv_heads 8"),
    (dict(strategy="allgather", heads_k_stride=0), "parallelism.heads_k_stride: 0 must divide n_kv_heads 8"),
]


@pytest.mark.parametrize("overrides,message", REJECTED, ids=[m.split(":")[0] + str(o) for o, m in REJECTED])
def test_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        _check(**overrides)
    text = str(err.value)
    assert text.startswith(message)
    assert "\n" not in text
