"""Every context-parallel strategy against single-device attention, on gloo CPU processes in fp32.

One process launch per world size runs all cases (a launch costs seconds, a case milliseconds);
the module-scoped fixtures hold the per-case errors that the parametrized tests then assert on.
Errors are relative (max |a - b| / max |b|) per sequence chunk of 1/(2P) of the sequence, so a
wrong gradient for any single K/V chunk fails even when the other chunks dominate the scale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from tests.dist_utils import run_distributed
from torchtitan_sp.attention import build_cp_attention
from torchtitan_sp.attention.comm_count import CommCounter, formula_elements
from torchtitan_sp.attention.reference import full_attention
from torchtitan_sp.attention.sharding import shard_sequence, unshard_sequence

TOL = 1e-5


@dataclass(frozen=True)
class Case:
    strategy: str
    n_heads: int = 4
    n_kv_heads: int = 4
    headtail: bool = True
    rotate: str = "allgather"
    ulysses: int = 1
    stride: int = 1
    docs: bool = False
    stale_kv: bool = False  # mutant: ring backward reusing step 0's K/V (must be caught)

    @property
    def name(self) -> str:
        parts = [self.strategy, f"h{self.n_heads}kv{self.n_kv_heads}", "headtail" if self.headtail else "contig"]
        if self.strategy in ("ring", "usp"):
            parts.append(self.rotate)
        if self.strategy == "usp":
            parts.append(f"u{self.ulysses}")
        if self.strategy == "allgather":
            parts.append(f"stride{self.stride}")
        if self.docs:
            parts.append("docs")
        if self.stale_kv:
            parts.append("STALE_KV_MUTANT")
        return "-".join(parts)


def _cases(world: int) -> list[Case]:
    cases = []
    for headtail in (True, False):
        for h, hkv in ((4, 4), (8, 2)):  # MHA; GQA (at P=4, ulysses replicates the 2 KV heads)
            for rotate in ("allgather", "alltoall"):
                cases.append(Case("ring", h, hkv, headtail, rotate))
            cases.append(Case("ring", h, hkv, headtail, docs=True))  # documents: pieces over gathered K/V
            for docs in (False, True):
                cases.append(Case("ulysses", h, hkv, headtail, docs=docs))
                for stride in (1, 2):
                    cases.append(Case("allgather", h, hkv, headtail, stride=stride, docs=docs))
            if world == 4:
                for rotate in ("allgather", "alltoall"):
                    cases.append(Case("usp", h, hkv, headtail, rotate, ulysses=2))
                cases.append(Case("usp", h, hkv, headtail, ulysses=2, docs=True))
    return cases


MUTANTS = [Case("ring", headtail=True, stale_kv=True), Case("ring", headtail=False, stale_kv=True)]


def _chunk_rel_err(a: torch.Tensor, b: torch.Tensor, n_chunks: int) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a.chunk(n_chunks, dim=2), b.chunk(n_chunks, dim=2)))


def _gather_seq(x: torch.Tensor, world: int, headtail: bool) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return unshard_sequence(parts, headtail, dim=2)


def _documents(batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Packed-sequence document ids: random boundaries, some documents spanning several shards."""
    starts = torch.rand(batch, seq_len, generator=gen) < 0.1
    starts[:, 0] = True
    return torch.cumsum(starts.long(), dim=1) - 1


def _stale_kv_backward(real):
    """Wrap the ring's block backward so every step uses the K/V of the first step it saw."""
    first: dict[str, torch.Tensor] = {}

    def block_bwd(**kw):
        first.setdefault("key", kw["key"])
        first.setdefault("value", kw["value"])
        if kw["key"].shape == first["key"].shape:
            kw["key"], kw["value"] = first["key"], first["value"]
        return real(**kw)
    return block_bwd


def _run_case(case: Case, mesh, rank: int, world: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1234)
    b, s, d = 2, 16 * world, 8
    q, dout = torch.randn(b, case.n_heads, s, d, generator=gen), torch.randn(b, case.n_heads, s, d, generator=gen)
    k, v = (torch.randn(b, case.n_kv_heads, s, d, generator=gen) for _ in range(2))
    docs = _documents(b, s, gen) if case.docs else None

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    if docs is None:  # single-device causal SDPA
        ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=case.n_heads != case.n_kv_heads)
    else:  # explicit block-diagonal causal mask
        ref = full_attention(qr, kr, vr, docs)
    ref.backward(dout)

    attn = build_cp_attention(case.strategy, mesh, load_balance=case.headtail, rotate_method=case.rotate,
                              ulysses_degree=case.ulysses, heads_k_stride=case.stride,
                              n_heads=case.n_heads, n_kv_heads=case.n_kv_heads)
    shard = functools.partial(shard_sequence, cp_rank=rank, cp_size=world, headtail=case.headtail)
    ql, kl, vl = (shard(t, dim=2).requires_grad_() for t in (q, k, v))
    out = attn(ql, kl, vl, None if docs is None else shard(docs, dim=1))
    if case.stale_kv:
        from torchtitan_sp.attention import torch_cp_compat as compat
        real = compat.ring_block_bwd
        compat.ring_block_bwd = _stale_kv_backward(real)
        try:
            out.backward(shard(dout, dim=2))
        finally:
            compat.ring_block_bwd = real
    else:
        out.backward(shard(dout, dim=2))

    n_chunks = 2 * world
    pairs = {"out": (out.detach(), ref.detach()), "dq": (ql.grad, qr.grad), "dk": (kl.grad, kr.grad),
             "dv": (vl.grad, vr.grad)}
    return {key: _chunk_rel_err(_gather_seq(a, world, case.headtail), bb, n_chunks) for key, (a, bb) in pairs.items()}


def _bytes_cases(world: int) -> list[tuple[str, dict, float]]:
    """(name, build kwargs, formula elements) at B=1, S=16P, D=8, 8 query / 4 KV heads (Hkv >= u)."""
    h, hkv, dh, s = 8, 4, 8, 16 * world
    d, dkv = h * dh, hkv * dh
    out = []
    for rotate in ("allgather", "alltoall"):
        out.append((f"ring-{rotate}", dict(strategy="ring", rotate_method=rotate),
                    formula_elements("ring", d, dkv, s, world)))
    out.append(("ulysses", dict(strategy="ulysses"), formula_elements("ulysses", d, dkv, s, world)))
    for stride in (1, 2):
        out.append((f"allgather-stride{stride}", dict(strategy="allgather", heads_k_stride=stride),
                    formula_elements("allgather", d, dkv, s, world)))
    if world == 4:
        out.append(("usp-2x2", dict(strategy="usp", ulysses_degree=2), formula_elements("usp", d, dkv, s, world, 2)))
    return out


def _measure_bytes(mesh, rank: int, world: int) -> dict[str, tuple[int, float]]:
    h, hkv, dh, s = 8, 4, 8, 16 * world
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, h, s // world, dh, generator=gen)
    k, v = (torch.randn(1, hkv, s // world, dh, generator=gen) for _ in range(2))
    res = {}
    for name, kwargs, elements in _bytes_cases(world):
        kwargs = dict(kwargs)
        attn = build_cp_attention(kwargs.pop("strategy"), mesh, load_balance=True, n_heads=h, n_kv_heads=hkv,
                                  **kwargs)
        with CommCounter() as counter:
            attn(q, k, v)
        res[name] = (counter.total_bytes(), elements * q.element_size())
    return res


def _counter_self_check(world: int) -> dict[str, tuple[int, int]]:
    """CommCounter on plain collectives, c10d and functional: (counted, expected) bytes sent."""
    import torch.distributed._functional_collectives as funcol
    group, n = dist.group.WORLD, 6 * world  # fp32 elements per input
    x = torch.ones(n)
    expected = {"all_gather": 4 * n * (world - 1), "reduce_scatter": 4 * n * (world - 1) // world,
                "all_to_all": 4 * n * (world - 1) // world}
    c10d_calls = {"all_gather": lambda: dist.all_gather_into_tensor(torch.empty(n * world), x),
                  "reduce_scatter": lambda: dist.reduce_scatter_tensor(torch.empty(n // world), x),
                  "all_to_all": lambda: dist.all_to_all_single(torch.empty(n), x)}
    funcol_calls = {"all_gather": lambda: funcol.all_gather_tensor(x, 0, group).wait(),
                    "reduce_scatter": lambda: funcol.reduce_scatter_tensor(x, "sum", 0, group).wait(),
                    "all_to_all": lambda: funcol.all_to_all_single(x, None, None, group).wait()}
    res = {}
    for kind, calls in (("c10d", c10d_calls), ("funcol", funcol_calls)):
        for op, call in calls.items():
            with CommCounter() as counter:
                call()
            res[f"{kind}.{op}"] = (counter.total_bytes(), expected[op])
    return res


def _worker(rank: int, world: int, cases: list[Case]) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    errors = {case.name: _run_case(case, mesh, rank, world) for case in cases}
    return {"errors": errors, "bytes": _measure_bytes(mesh, rank, world), "counter": _counter_self_check(world)}


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_distributed(_worker, world, _cases(world) + MUTANTS)


@pytest.mark.parametrize("case", _cases(2), ids=lambda c: c.name)
def test_matches_single_device_p2(case: Case) -> None:
    for rank, res in enumerate(_results(2)):
        errs = res["errors"][case.name]
        assert max(errs.values()) <= TOL, f"rank {rank}: {errs}"


@pytest.mark.parametrize("case", _cases(4), ids=lambda c: c.name)
def test_matches_single_device_p4(case: Case) -> None:
    for rank, res in enumerate(_results(4)):
        errs = res["errors"][case.name]
        assert max(errs.values()) <= TOL, f"rank {rank}: {errs}"


@pytest.mark.parametrize("world", [2, 4])
def test_ring_backward_reusing_one_steps_kv_is_caught(world: int) -> None:
    for case in MUTANTS:
        errs = _results(world)[0]["errors"][case.name]
        assert errs["out"] <= TOL  # forward untouched
        assert max(errs["dk"], errs["dv"]) > 1e-2, f"per-chunk K/V gradient check missed the mutant: {errs}"


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_per_layer_match_formula(world: int) -> None:
    for rank, res in enumerate(_results(world)):
        for name, (measured, formula) in res["bytes"].items():
            assert measured == formula, f"rank {rank} {name}: counted {measured} B, formula {formula} B"


@pytest.mark.parametrize("world", [2, 4])
def test_comm_counter_counts_plain_collectives(world: int) -> None:
    for name, (counted, expected) in _results(world)[0]["counter"].items():
        assert counted == expected, f"{name}: counted {counted} B, expected {expected} B"
