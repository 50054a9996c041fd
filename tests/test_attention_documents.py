"""Packed-document attention at scale: the BlockMask is built by the compiled create_block_mask (the
eager one materializes an S x S mask), and the document ids are gathered once per micro-batch, not
once per layer."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention.flex_attention import create_block_mask

from tests.dist_utils import run_distributed
from torchtitan_sp.attention import build_cp_attention
from torchtitan_sp.attention.comm_count import CommCounter
from torchtitan_sp.attention.local import document_block_mask, flex_document_attention
from torchtitan_sp.attention.reference import full_attention
from torchtitan_sp.attention.sharding import shard_sequence


def _documents(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq_len, generator=gen) < 0.01
    starts[:, 0] = True
    return torch.cumsum(starts.long(), dim=1) - 1


def test_compiled_block_mask_equals_eager():
    docs = _documents(2, 1024, 0)  # two rows with different boundaries

    def mask_mod(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

    want = create_block_mask(mask_mod, 2, None, 1024, 1024, device="cpu")
    got = document_block_mask(docs)
    assert torch.equal(got.to_dense(), want.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert 0 < int(got.full_kv_num_blocks.sum()) < int(want.to_dense().sum())  # both kinds of block occur


def test_flex_document_attention_forward_on_cpu():
    """The GPU path of LocalAttention with documents (compiled flex_attention + compiled BlockMask),
    called directly and from inside a compiled block as the trainer does, equals the explicit-mask
    reference. Forward only: FlexAttention has no backward on CPU (the GPU check covers it)."""
    docs = _documents(1, 512, 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 512, 16, generator=gen), *(torch.randn(1, 2, 512, 16, generator=gen) for _ in range(2))
    want = full_attention(q, k, v, docs)
    block = torch.compile(lambda q, k, v, d: flex_document_attention(q, k, v, d) * 2.0)
    with torch.no_grad():
        torch.testing.assert_close(flex_document_attention(q, k, v, docs), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(block(q, k, v, docs), 2.0 * want, rtol=0, atol=2e-5)


def _gathers_per_layer(rank: int, world: int) -> dict[str, list[int]]:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    out = {}
    for strategy in ("ulysses", "allgather", "ring"):
        layers = [build_cp_attention(strategy, mesh, load_balance=True, n_heads=4, n_kv_heads=2) for _ in range(3)]
        sent = []
        for seed in (1, 2):
            ids = shard_sequence(_documents(1, 32, seed), cp_rank=rank, cp_size=world, headtail=True, dim=1)
            for layer in layers:  # one micro-batch through three layers, then the next micro-batch
                with CommCounter() as counter:
                    layer(q, k, v, ids)
                sent.append(counter.total_bytes())
        out[strategy] = sent
    return out


def test_document_ids_gathered_once_per_micro_batch():
    """The first layer of each micro-batch sends the ids too (one int64 gather); the others do not."""
    sent = run_distributed(_gathers_per_layer, 2)[0]
    for strategy, per_layer in sent.items():
        first, rest = per_layer[0], per_layer[1:3]
        assert rest == [rest[0]] * 2 and first > rest[0], (strategy, per_layer)
        assert per_layer[3:] == per_layer[:3], (strategy, per_layer)  # the next micro-batch gathers again
