"""Tensor parallel with Megatron sequence parallelism (DTensor layouts).

Between blocks every rank holds S/tp tokens of the activations (Shard(1), plain local tensors).
Before attention and the feed-forward the normed input is all-gathered to the full (cp-local)
sequence; wq/wk/wv/w1/w3 are column-wise (local heads, local hidden units) and wo/w2 are
row-wise, reduce-scattering their partial sums back to Shard(1). Per layer and rank that is
two all-gathers and two reduce-scatters of d x S x (t-1)/t elements each.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from torchtitan_sp.models.llama3 import Transformer

logger = logging.getLogger(__name__)


class _SyncRowwiseParallel(RowwiseParallel):
    """RowwiseParallel whose reduce-scatter completes before the output leaves the module.

    Stock RowwiseParallel returns an AsyncCollectiveTensor. Passed from eager code (the
    embedding) into a torch.compile'd block, on torch 2.13 the compiled backward returns no
    gradient for it, and the embedding's backward then fails with "'Tensor' object has no
    attribute '_local_tensor'". A plain tensor keeps the gradient; inside compiled blocks
    inductor schedules the collectives anyway, so only this eager boundary needs it.
    """

    @staticmethod
    def _prepare_output_fn(output_layouts: tuple[Placement, ...], use_local_output: bool, mod: nn.Module,
                           outputs: DTensor, device_mesh: DeviceMesh) -> torch.Tensor:
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts, async_op=False)
        return outputs.to_local() if use_local_output else outputs


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool) -> None:
    """Shard every linear layer over `tp_mesh`, in place.

    With `loss_parallel` the logits stay a DTensor sharded over the vocabulary (Shard(-1)) and the
    cross-entropy, run under `torch.distributed.tensor.parallel.loss_parallel()`, never gathers them.
    """
    tp = tp_mesh.size()
    args = model.args
    if args.n_heads % tp or args.n_kv_heads % tp:
        raise ValueError(f"tensor_parallel_degree {tp} must divide n_heads {args.n_heads} "
                         f"and n_kv_heads {args.n_kv_heads}")
    parallelize_module(model, tp_mesh, {
        # Tokens are the same on every tp rank; each rank looks up its vocabulary rows and the
        # partial sums are reduce-scattered over the sequence.
        "tok_embeddings": _SyncRowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1),
                                  output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    })
    if args.tie_word_embeddings:  # both plans shard the (vocab, dim) weight by rows: Shard(0), one layout
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # forward(x, cos, sin, document_ids): only x is a DTensor; cos/sin/document_ids are
            # plain tensors of the full (cp-local) sequence, the same on every tp rank.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
    if async_tp:
        enable_async_tp(tp_mesh)
    logger.info(f"tensor parallel {tp} (Megatron sequence parallel), loss parallel {loss_parallel}, "
                f"async TP {async_tp}; {args.n_heads // tp} query / {args.n_kv_heads // tp} KV heads per rank")


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor fuse the TP all-gather/reduce-scatter with the neighbouring matmuls
    (micro-pipelining over symmetric memory). Needs CUDA and torch.compile of the blocks,
    which validation checks (ParallelDims.validate)."""
    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    with warnings.catch_warnings():  # needed on older torch, a deprecated no-op on newer
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
