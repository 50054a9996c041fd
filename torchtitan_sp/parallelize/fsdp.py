"""FSDP2: shard parameters, gradients and optimizer states over dp_shard x cp (HSDP with dp_replicate)."""

from __future__ import annotations

import logging

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from torchtitan_sp.models.llama3 import Transformer

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def reshard_after_forward(policy: str, shard_ranks: int, cpu_offload: bool = False) -> bool:
    """With one rank per shard group, resharding frees only the 16-bit copy of a block (2 B per
    parameter) and costs a second cast + copy of every block's parameters in backward. (TorchTitan
    applies no FSDP at all there, so it never reshards either; elsewhere "default" is its True.)
    Under CPU offload the default reshards anyway: the device could not hold every block's copy."""
    return policy == "always" or (policy == "default" and (shard_ranks > 1 or cpu_offload))


def apply_fsdp(model: Transformer, meshes: dict[str, DeviceMesh], param_dtype: str, reduce_dtype: str,
               reshard_policy: str, cpu_offload: bool = False) -> None:
    """fully_shard every block, then the root (embedding, final norm, output; FSDP2 keeps the
    root unsharded from forward to backward by itself).

    cp ranks hold different tokens of the same samples, so they are data-parallel for the
    weights: sharding over dp_shard x cp keeps them from each holding a full copy.
    With `cpu_offload` the sharded fp32 parameters and gradients (and so AdamW's states) live in
    host memory, pinned on GPUs for asynchronous copies; each block's shard is copied to the device
    before its all-gather. The model must then be materialized on the CPU.
    """
    fsdp_mesh = meshes.get("hsdp", meshes["dp_shard_cp"])  # HSDP: replicate x shard
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    reshard = reshard_after_forward(reshard_policy, meshes["dp_shard_cp"].size(), cpu_offload)
    offload = CPUOffloadPolicy(pin_memory=fsdp_mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=fsdp_mesh, mp_policy=mp, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, offload_policy=offload)
    # The chunked loss calls model.hidden_states, not forward: the root must unshard there.
    register_fsdp_forward_method(model, "hidden_states")
    # The loss is already divided by the global number of valid tokens: reduce gradients by sum.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if fsdp_mesh.device_type == "cpu":
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    over = " x ".join(f"{name} {size}" for name, size in zip(fsdp_mesh.mesh_dim_names, fsdp_mesh.shape))
    logger.info(f"FSDP2 over {over}, "
                f"params {param_dtype}, reduce {reduce_dtype}, reshard after forward: {reshard}"
                + (", CPU offload of parameters, gradients and optimizer states" if cpu_offload else ""))
