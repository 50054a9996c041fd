"""Memory savers keep the numbers: chunked loss (one process, FSDP2, TP loss-parallel), tiled MLP,
activation offload."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from tests.dist_utils import run_distributed
from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.config import ActivationCheckpoint, Config
from torchtitan_sp.loss import compiled_cross_entropy_sum, cross_entropy_sum, loss_chunk_tokens, model_loss_sum
from torchtitan_sp.models.llama3 import ModelArgs, Transformer, _canonical, init_weights
from torchtitan_sp.parallel_dims import ParallelDims
from torchtitan_sp.parallelize import memory, parallelize_llama
from torchtitan_sp.parallelize.ac import apply_ac

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=64,
                 ffn_dim_multiplier=None)


def make_model(seed: int = 0) -> Transformer:
    model = Transformer(ARGS)
    init_weights(model, seed)
    return model


def make_batch(seed: int, b: int = 2, s: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, ARGS.vocab_size, (b, s), generator=g)
    labels[0, :5] = IGNORE_INDEX
    return {"tokens": torch.randint(0, ARGS.vocab_size, (b, s), generator=g),
            "positions": torch.arange(s).expand(b, s), "document_ids": torch.zeros(b, s, dtype=torch.long),
            "labels": labels}


def plain_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: full logits, one cross-entropy."""
    return cross_entropy_sum(model(batch["tokens"], batch["positions"]), batch["labels"])


def loss_and_grads(model: Transformer, loss: torch.Tensor, n: int) -> tuple[float, dict[str, torch.Tensor]]:
    (loss / n).backward()
    grads = {_canonical(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()) / n, grads


def assert_same(a: tuple[float, dict], b: tuple[float, dict], atol: float = 1e-6) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-6, abs=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("chunk", [7, 80, 1000])  # uneven chunks, whole batch, one chunk
def test_chunked_loss_equals_plain(chunk):
    model, batch = make_model(), make_batch(1)
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    ref = loss_and_grads(model, plain_loss(model, batch), n)
    assert_same(loss_and_grads(model, model_loss_sum(model, batch, False, chunk_tokens=chunk), n), ref)


def test_compiled_cross_entropy_equals_eager():
    """compile.enable's cross-entropy, whole and chunked (7-row chunks: two static shapes): the
    same loss and gradients as eager, and 0 (not NaN) for logits whose labels are all ignored."""
    model, batch = make_model(), make_batch(3)
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    ref = loss_and_grads(model, plain_loss(model, batch), n)
    for chunk in (None, 7):
        loss = model_loss_sum(model, batch, False, chunk_tokens=chunk, ce=compiled_cross_entropy_sum())
        assert_same(loss_and_grads(model, loss, n), ref, atol=1e-5)
    ignored = torch.full((2, 40), IGNORE_INDEX)
    assert compiled_cross_entropy_sum()(torch.randn(2, 40, ARGS.vocab_size), ignored).item() == 0.0
    # 16-bit logits: fp32 math inside, the gradient rounded once, as eager does.
    logits = torch.randn(2, 40, ARGS.vocab_size, dtype=torch.bfloat16)
    grads = []
    for ce in (cross_entropy_sum, compiled_cross_entropy_sum()):
        x = logits.clone().requires_grad_()
        loss = ce(x, batch["labels"])
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=0)
    assert torch.equal(grads[0][1].abs().amax(-1) > 0, batch["labels"] != IGNORE_INDEX)  # rows of valid labels
    torch.testing.assert_close(grads[1][1].float(), grads[0][1].float(), rtol=2**-7, atol=0)  # one bf16 ulp


def test_loss_chunk_never_holds_full_logits():
    seen = []
    model, batch = make_model(), make_batch(2)
    model.output.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    model_loss_sum(model, batch, False, chunk_tokens=16).backward()
    assert max(seen) == 16 and sum(seen) == 2 * 80  # forward + recomputation in backward, 16 rows at most
    assert loss_chunk_tokens(128256) == 523  # 256 MiB of fp32 logits per chunk for Llama 3


def _distributed_loss(rank: int, world: int, tp: int, loss_par: bool) -> None:
    """FSDP2 over `world` ranks (each its own batch) or TP over `world` (one shared batch): chunked
    loss + gradients equal the single-process plain loss over all the ranks' tokens."""
    cfg = Config()
    cfg.parallelism.tensor_parallel_degree = tp
    cfg.parallelism.disable_loss_parallel = not loss_par
    dims = ParallelDims.from_config(cfg, world)
    with torch.device("meta"):
        model = Transformer(ARGS)
    parallelize_llama(model, dims.build_mesh("cpu"), cfg, "float32")
    model.to_empty(device="cpu")
    init_weights(model, 0)
    batches = [make_batch(10)] if tp > 1 else [make_batch(10 + r) for r in range(world)]
    n = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    with loss_parallel() if tp > 1 and loss_par else torch.enable_grad():
        loss = model_loss_sum(model, batches[0 if tp > 1 else rank], False, chunk_tokens=9)
        got = loss_and_grads(model, loss, n)
    if isinstance(loss, DTensor):
        got = (float(loss.full_tensor()) / n, got[1])
    else:  # FSDP: each rank's sum over its own tokens
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        got = (float(total) / n, got[1]) if tp == 1 else got
    ref_model = make_model()
    ref = loss_and_grads(ref_model, sum(plain_loss(ref_model, b) for b in batches), n)
    assert_same(got, ref, atol=2e-6)


def _distributed_cases(rank: int, world: int) -> None:
    for tp, loss_par in ((1, True), (2, True), (2, False)):  # FSDP2; TP loss-parallel; TP gathered logits
        _distributed_loss(rank, world, tp, loss_par)


def test_chunked_loss_fsdp2_and_tp():
    run_distributed(_distributed_cases, 2)


def test_tiled_mlp_identical():
    model, batch = make_model(), make_batch(3, s=41)  # 41 tokens: uneven tiles
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    ref = loss_and_grads(model, model_loss_sum(model, batch, False), n)
    tiled = copy.deepcopy(model)
    assert memory.apply_tiled_mlp(tiled, 4)
    assert isinstance(tiled.layers["0"].feed_forward, memory.TiledFeedForward)
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert_same(loss_and_grads(tiled, model_loss_sum(tiled, batch, False), n), ref)
    assert not memory.apply_tiled_mlp(copy.deepcopy(model), 1)


def test_tiled_mlp_bounds_the_intermediates():
    """Every (tokens, ffn_hidden) tensor the feed-forward makes, forward or backward, is one tile."""
    model, batch = make_model(), make_batch(4, b=1, s=64)
    memory.apply_tiled_mlp(model, 4)
    rows = []
    for block in model.layers.values():
        block.feed_forward.w1.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    model_loss_sum(model, batch, False).backward()
    assert rows == [16] * 16  # 2 layers x 4 tiles x (forward + recomputation)


@pytest.mark.parametrize("tiled", [1, 3])
def test_offload_with_full_ac_identical(monkeypatch, tiled):
    """On CPU the hooks keep tensors where they are; they must see exactly the block inputs
    (and the final norm's input): what a GPU run moves to pinned host memory."""
    model, batch = make_model(), make_batch(5, s=64)
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    ref = loss_and_grads(model, model_loss_sum(model, batch, False), n)
    off = copy.deepcopy(model)
    memory.apply_tiled_mlp(off, tiled)
    apply_ac(off, ActivationCheckpoint(mode="full", offload=True))
    memory.apply_activation_offload(off)
    would_offload = []
    pack = memory._OffloadToHost._pack.__func__

    def spy(cls, t):
        if t.grad_fn is not None and t.nbytes >= 2 * 64 * 64 * 4:  # (B, S, dim) fp32 activations
            would_offload.append(type(t.grad_fn).__name__)
        return pack(cls, t)

    monkeypatch.setattr(memory._OffloadToHost, "_pack", classmethod(spy))
    monkeypatch.setattr(memory, "OFFLOAD_MIN_BYTES", 0)
    assert_same(loss_and_grads(off, model_loss_sum(off, batch, False), n), ref)
    # each block's input, then the final norm's input (and, with CPU's composite RMSNorm, its x * rstd)
    assert would_offload[:ARGS.n_layers + 1] == ["EmbeddingBackward0"] + ["AddBackward0"] * ARGS.n_layers
    assert len(would_offload) <= ARGS.n_layers + 3


def test_offloadable_activations_only():
    """Big non-leaf tensors on an accelerator (meta stands in); never weights, CPU or small tensors."""
    weight = torch.nn.Parameter(torch.empty(1024, 1024, device="meta"))
    act = torch.empty(1024, 1024, device="meta", requires_grad=True) * 2
    assert memory.offloadable(act)
    assert not memory.offloadable(weight)  # a compiled block saves its weights: FSDP owns those
    assert not memory.offloadable(act[:8])  # 32 KB: stays
    assert not memory.offloadable(torch.ones(1024, 1024, requires_grad=True) * 2)  # CPU


def test_offload_marks_the_model():
    model = make_model()
    assert not isinstance(memory.activation_offload(model), memory._OffloadToHost)
    memory.apply_activation_offload(model)
    assert isinstance(memory.activation_offload(model), memory._OffloadToHost)

