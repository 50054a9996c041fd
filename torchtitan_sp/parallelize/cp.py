"""Context parallelism: every block's inner attention becomes the configured cp strategy.

The other half of CP, sharding tokens, labels, positions and document ids over the cp ranks,
happens once per batch in the train step (torchtitan_sp.attention.sharding).
"""

from __future__ import annotations

import logging

from torch.distributed.device_mesh import DeviceMesh

from torchtitan_sp.attention import build_cp_attention
from torchtitan_sp.config import Parallelism
from torchtitan_sp.models.llama3 import Transformer

logger = logging.getLogger(__name__)


def apply_cp(model: Transformer, cp_mesh: DeviceMesh, p: Parallelism) -> None:
    args = model.args
    # One module for every block: it holds no parameters, and one instance means one set of
    # process groups (usp creates its own) and one compiled graph for all blocks (Dynamo guards on
    # the group, so a module per block would recompile per block).
    attention = build_cp_attention(
        p.context_parallel_strategy, cp_mesh,
        load_balance=p.load_balance,
        rotate_method=p.context_parallel_rotate_method,
        ulysses_degree=p.context_parallel_ulysses_degree,
        heads_k_stride=p.heads_k_stride,
        # the heads this rank's attention sees: tensor parallelism splits them first
        n_heads=args.n_heads // p.tensor_parallel_degree,
        n_kv_heads=args.n_kv_heads // p.tensor_parallel_degree)
    for block in model.layers.values():
        block.attention.inner_attention = attention
    logger.info(f"context parallel: {p.context_parallel_strategy} over cp={cp_mesh.size()}, "
                f"load balancer {p.context_parallel_load_balancer}")
