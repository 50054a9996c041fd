"""Strategies inside the Llama 3 model, on a cp sub-mesh of a dp x cp mesh, eager and compiled.

One 4-process launch: mesh (dp 2, cp 2), each dp replica with its own data, so a strategy that
talks across replicas (wrong sub-groups) fails.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tests.dist_utils import run_distributed
from torchtitan_sp.attention import build_cp_attention
from torchtitan_sp.attention.sharding import shard_sequence, unshard_sequence
from torchtitan_sp.models.llama3 import FLAVORS, Transformer, init_weights

TOL = 1e-5
# (strategy, ulysses degree, packed documents, compile backend or None[, KV heads instead of the flavor's 4])
SETUPS = [
    ("ring", 1, False, None),
    ("ulysses", 1, True, None),
    ("allgather", 1, True, None),
    ("usp", 2, False, None),  # u = cp: a one-rank ring
    ("usp", 1, False, None),  # u = 1: a ring over the ring sub-group
    # Each block compiled, as the trainer does; aot_eager runs Dynamo and AOTAutograd (where
    # tracing fails) without inductor's codegen. ring runs eagerly inside (torch.compiler.disable).
    ("ring", 1, False, "aot_eager"),
    ("ulysses", 1, True, "aot_eager"),
    ("ring", 1, True, "aot_eager"),  # packed documents: allgather's pieces, eager inside the compiled block
    ("usp", 1, True, None),
    # Ulysses degree > KV heads (GQA 8:1): each rank's head shard needs the one KV head replicated.
    ("ulysses", 1, False, None, 1),
    ("ulysses", 1, True, None, 1),
]


def _name(setup: tuple) -> str:
    strategy, u, docs, backend, *kv = setup
    return (f"{strategy}-u{u}" + ("-docs" if docs else "") + (f"-compiled_{backend}" if backend else "")
            + (f"-kv{kv[0]}" if kv else ""))


def _batch(seed: int, seq_len: int, vocab: int, docs: bool):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (2, seq_len), generator=gen)
    if not docs:
        return tokens, torch.arange(seq_len).expand(2, -1), None
    starts = torch.rand(2, seq_len, generator=gen) < 0.1
    starts[:, 0] = True
    doc_ids = torch.cumsum(starts.long(), 1) - 1
    idx = torch.arange(seq_len).expand(2, -1)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return tokens, idx - first, doc_ids  # positions restart at each document


def _worker(rank: int, world: int) -> dict[str, float]:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    cp_mesh, cp_rank, dp_rank = mesh["cp"], mesh["cp"].get_local_rank(), mesh["dp"].get_local_rank()
    flavor = FLAVORS["debug"]
    seq_len, results = 32, {}
    for setup in SETUPS:
        strategy, u, docs, backend, *kv = setup
        args = type(flavor)(**{**flavor.__dict__, "n_layers": 1, "n_kv_heads": kv[0] if kv else flavor.n_kv_heads})
        tokens, positions, doc_ids = _batch(100 + dp_rank, seq_len, args.vocab_size, docs)
        ref_model = Transformer(args)
        init_weights(ref_model, seed=0)
        ref = ref_model(tokens, positions, doc_ids)
        ref.square().mean().backward()

        model = Transformer(args)
        init_weights(model, seed=0)
        for name, block in model.layers.items():
            block.attention.inner_attention = build_cp_attention(
                strategy, cp_mesh, load_balance=True, ulysses_degree=u, n_heads=args.n_heads,
                n_kv_heads=args.n_kv_heads)
            if backend:
                model.layers[name] = torch.compile(block, backend=backend)
        shard = functools.partial(shard_sequence, cp_rank=cp_rank, cp_size=2, headtail=True, dim=1)
        out = model(shard(tokens), shard(positions), None if doc_ids is None else shard(doc_ids))
        # The loss is a mean over the whole sequence: each cp rank's part is its sum / all tokens.
        (out.square().sum() / ref.numel()).backward()
        parts = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(parts, out.detach().contiguous(), group=cp_mesh.get_group())
        logits_err = ((unshard_sequence(parts, True, dim=1) - ref).abs().max() / ref.abs().max()).item()
        grad_err = 0.0
        for (_, p), (_, p_ref) in zip(model.named_parameters(), ref_model.named_parameters()):
            g = p.grad.clone()
            dist.all_reduce(g, group=cp_mesh.get_group())  # gradients of the cp ranks' token shares
            grad_err = max(grad_err, ((g - p_ref.grad).abs().max() / p_ref.grad.abs().max()).item())
        results[_name(setup)] = max(logits_err, grad_err)
    return results


@functools.lru_cache(maxsize=None)
def _results() -> list[dict[str, float]]:
    return run_distributed(_worker, 4)


@pytest.mark.parametrize("setup", SETUPS, ids=_name)
def test_model_matches_single_process(setup: tuple) -> None:
    for rank, res in enumerate(_results()):
        assert res[_name(setup)] <= TOL, f"rank {rank}: {res[_name(setup)]:.2e}"


def _cp_groups_worker(rank: int, world: int) -> tuple[int, bool]:
    from torch.distributed.distributed_c10d import _world

    from torchtitan_sp.config import load_config
    from torchtitan_sp.models.shape import model_args
    from torchtitan_sp.parallel_dims import ParallelDims
    from torchtitan_sp.parallelize.cp import apply_cp
    cfg = load_config(["--parallelism.context_parallel_degree", "4", "--parallelism.context_parallel_strategy",
                       "usp", "--parallelism.context_parallel_ulysses_degree", "2", "--model.n_layers", "6"])
    meshes = ParallelDims.from_config(cfg, world).build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(model_args(cfg.model))
    before = len(_world.pg_map)
    apply_cp(model, meshes["cp"], cfg.parallelism)
    modules = {id(block.attention.inner_attention) for block in model.layers.values()}
    return len(_world.pg_map) - before, len(modules) == 1


def test_usp_creates_its_groups_once_for_all_blocks() -> None:
    """usp's ring x Ulysses view of the cp mesh makes two process groups; one module serves every
    block (a module per block made 2 groups per layer: 64 NCCL communicators for Llama-3-8B)."""
    new_groups, shared = run_distributed(_cp_groups_worker, 4)[0]
    assert shared and new_groups == 2, (new_groups, shared)
