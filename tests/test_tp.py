"""Tensor parallel (Megatron TP-SP): parity with one process for the model, the trainer under
TP x CP and TP x FSDP, compile, the communication volume, and the configuration errors."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from tests.dist_utils import run_distributed
from tests.trainer_utils import tiny_args, train
from torchtitan_sp.attention.comm_count import CommCounter
from torchtitan_sp.config import ConfigError, load_config
from torchtitan_sp.models.llama3 import FLAVORS, Transformer, init_weights, rope_angles
from torchtitan_sp.parallelize.tp import apply_tp
from torchtitan_sp.rules import validate

B, S = 2, 64
funcol = torch.ops.c10d_functional  # the op names CommDebugMode reports


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _tp_model_worker(rank: int, world_size: int) -> dict[str, Any]:
    """One process's reference vs the tp model (both loss layouts); one block's collectives."""
    args = FLAVORS["debug"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, args.vocab_size, (B, S), generator=g)
    positions = torch.arange(S).expand(B, -1)

    ref = Transformer(args)
    init_weights(ref, seed=0)
    ref_logits = ref(tokens, positions)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum")
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    out: dict[str, Any] = {}
    for lp in (True, False):
        with torch.device("meta"):
            model = Transformer(args)
        apply_tp(model, mesh, loss_parallel=lp, async_tp=False)
        model.to_empty(device="cpu")
        init_weights(model, seed=0)
        seen: dict[str, Any] = {}
        model.layers["1"].register_forward_pre_hook(lambda m, a: seen.update(block_in=(type(a[0]), a[0].shape)))
        model.layers["0"].attention.inner_attention.register_forward_pre_hook(
            lambda m, a: seen.update(heads=(a[0].shape[1], a[1].shape[1])))
        with loss_parallel() if lp else contextlib.nullcontext():
            logits = model(tokens, positions)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            loss.backward()
        out[lp] = {
            "logits_placements": str(logits.placements) if isinstance(logits, DTensor) else "plain",
            "logits_err": _rel(_full(logits), ref_logits),
            "loss_err": abs(_full(loss).item() - ref_loss.item()) / ref_loss.item(),
            "grad_err": max(_rel(_full(p.grad), ref_grads[n]) for n, p in model.named_parameters()),
            **seen,
        }

    # One block's forward: the TP-SP collectives and the bytes they send.
    x = torch.randn(B, S // world_size, args.dim)  # this rank's sequence shard
    cos, sin = rope_angles(positions, args)
    with torch.no_grad(), CommDebugMode() as comm, CommCounter() as counter:
        model.layers["0"](x, cos, sin, None)
    out["comm_counts"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    out["comm_bytes"] = sum(r.bytes_sent for r in counter.records if r.group_size == world_size)
    return out


@pytest.fixture(scope="module")
def tp2_model() -> dict[str, Any]:
    return run_distributed(_tp_model_worker, 2)[0]


@pytest.mark.parametrize("loss_par", [True, False])
def test_tp2_forward_backward_match_single_process(tp2_model, loss_par):
    r = tp2_model[loss_par]
    assert r["logits_placements"] == ("(Shard(dim=2),)" if loss_par else "plain")
    assert r["logits_err"] < 1e-5 and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    assert r["heads"] == (8 // 2, 4 // 2)  # local query / KV heads reach the inner attention
    assert r["block_in"] == (torch.Tensor, (B, S // 2, FLAVORS["debug"].dim))  # sequence-sharded between blocks


def test_tp_sp_communication_per_layer(tp2_model):
    """Forward per layer and rank: 2 all-gathers + 2 reduce-scatters, 4 x d x S x (t-1)/t elements."""
    counts = tp2_model["comm_counts"]
    assert counts == {str(funcol.all_gather_into_tensor): 2, str(funcol.reduce_scatter_tensor): 2}, counts
    t, d = 2, FLAVORS["debug"].dim
    assert tp2_model["comm_bytes"] == 4 * d * B * S * (t - 1) // t * 4  # fp32


# ---- the trainer: logged loss and gradient norm equal a single process's ----------------------

def _close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """One process, local batch 2: the global batch of every run below."""
    return run_distributed(train, 1, tiny_args(tmp_path_factory.mktemp("ref"), "--training.local_batch_size", "2"))[0]


@pytest.mark.parametrize("world, extra", [
    (4, ["--parallelism.context_parallel_degree", "2"]),  # tp2 x cp2 ring, FSDP over cp
    (4, ["--parallelism.context_parallel_degree", "2", "--parallelism.context_parallel_strategy", "ulysses"]),
    (4, ["--training.local_batch_size", "1", "--parallelism.disable_loss_parallel"]),  # tp2 x dp2
], ids=["cp2-ring", "cp2-ulysses", "dp2-no-loss-parallel"])
def test_trainer_tp2_matches_single_process(tmp_path, reference, world, extra):
    m = run_distributed(train, world, tiny_args(tmp_path, "--training.local_batch_size", "2",
                                                "--parallelism.tensor_parallel_degree", "2", *extra))[0]
    assert _close([x["loss"] for x in m], [x["loss"] for x in reference], 1e-5)
    # fp32 vector_norm over 262K elements is itself only ~3e-5 exact on CPU (sharded sums differ)
    assert _close([x["grad_norm"] for x in m], [x["grad_norm"] for x in reference], 1e-4)
    assert m[-1]["tokens_seen"] == reference[-1]["tokens_seen"]


def test_trainer_tp2_compiled_blocks(tmp_path, reference):
    """Block 0 under full AC (compiled inside its checkpoint), block 1 compiled whole."""
    m = run_distributed(train, 2, tiny_args(tmp_path, "--training.local_batch_size", "2", "--training.steps", "3",
                                            "--parallelism.tensor_parallel_degree", "2", "--compile.enable",
                                            "--activation_checkpoint.mode", "selective",
                                            "--activation_checkpoint.selective_ac_option", "2"))[0]
    assert _close([x["loss"] for x in m], [x["loss"] for x in reference[:3]], 1e-4)


# ---- bad input: one line naming the numbers --------------------------------------------------

@pytest.mark.parametrize("argv, world, message", [
    (["--parallelism.tensor_parallel_degree", "3"], 6,
     "parallelism.tensor_parallel_degree 3 must divide the model's heads (n_heads 8, n_kv_heads 4"),
    (["--parallelism.tensor_parallel_degree", "8"], 8,
     "parallelism.tensor_parallel_degree 8 must divide the model's heads (n_heads 8, n_kv_heads 4"),
    (["--parallelism.tensor_parallel_degree", "2"], 3,
     "tensor_parallel_degree 2 = 2 does not divide the world size 3"),
    (["--parallelism.tensor_parallel_degree", "2", "--parallelism.context_parallel_degree", "2",
      "--training.seq_len", "100"], 4, "training.seq_len 100 is not divisible by 2 x cp x tp = 2 x 2 x 2 = 8"),
    (["--parallelism.enable_async_tensor_parallel"], 2,
     "parallelism.enable_async_tensor_parallel needs tensor_parallel_degree > 1"),
    (["--parallelism.enable_async_tensor_parallel", "--parallelism.tensor_parallel_degree", "2"], 2,
     "parallelism.enable_async_tensor_parallel needs compile.enable = true"),
])
def test_bad_tp_config_one_line(argv, world, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(argv), world)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_async_tp_needs_cuda():
    cfg = load_config(["--parallelism.enable_async_tensor_parallel", "--parallelism.tensor_parallel_degree", "2",
                       "--compile.enable"])
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        validate(cfg, 2)


def test_bad_tp_exits_2_with_one_line(capsys):
    from torchtitan_sp.rules import load_and_validate
    with pytest.raises(SystemExit) as e:
        load_and_validate(["--parallelism.tensor_parallel_degree", "3"], world_size=3)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "tensor_parallel_degree 3 must divide" in err
