"""parallelize_llama: the techniques in their fixed order TP -> CP -> AC -> compile -> FSDP2."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from torchtitan_sp.attention import GATHERED_FOR_DOCUMENTS
from torchtitan_sp.config import Config
from torchtitan_sp.models.llama3 import Transformer
from torchtitan_sp.parallelize.ac import apply_ac
from torchtitan_sp.parallelize.compile import apply_compile
from torchtitan_sp.parallelize.fsdp import apply_fsdp
from torchtitan_sp.parallelize.memory import apply_activation_offload, apply_tiled_mlp


def parallelize_llama(model: Transformer, meshes: dict[str, DeviceMesh], cfg: Config, param_dtype: str) -> list[str]:
    """Apply each enabled technique in place; returns what was applied, for the start-up summary."""
    p, applied = cfg.parallelism, []
    if meshes["tp"].size() > 1:
        from torchtitan_sp.parallelize.tp import apply_tp
        apply_tp(model, meshes["tp"], loss_parallel=not p.disable_loss_parallel,
                 async_tp=p.enable_async_tensor_parallel)
        applied.append(f"TP-SP {meshes['tp'].size()}")
    if meshes["cp"].size() > 1:
        from torchtitan_sp.parallelize.cp import apply_cp
        apply_cp(model, meshes["cp"], p)
        docs = cfg.training.document_masks and p.context_parallel_strategy in GATHERED_FOR_DOCUMENTS
        u = p.context_parallel_ulysses_degree
        applied.append(f"CP {p.context_parallel_strategy} {meshes['cp'].size()}"
                       + (f" (ulysses {u} x ring {meshes['cp'].size() // u})" if p.context_parallel_strategy == "usp"
                          else "")
                       + (" (packed documents: K/V all-gathered one head at a time, attended per document piece)"
                          if docs else ""))
    ac = cfg.activation_checkpoint
    if apply_tiled_mlp(model, ac.tiled_mlp_shards):
        applied.append(f"tiled MLP {ac.tiled_mlp_shards}")
    if ac.mode != "none":
        apply_ac(model, ac)
        applied.append(f"AC {ac.mode}" + (f" {ac.selective_ac_option}" if ac.mode == "selective" else ""))
    if ac.offload:
        apply_activation_offload(model)
        applied.append("activation offload")
    if cfg.compile.enable:
        apply_compile(model)
        applied.append("compile")
    offload = cfg.training.enable_cpu_offload
    apply_fsdp(model, meshes, param_dtype, cfg.training.mixed_precision_reduce, p.fsdp_reshard_after_forward, offload)
    applied.append(f"FSDP2 {meshes['dp_shard_cp'].size()}" + (f" x HSDP {meshes['dp_replicate'].size()}"
                                                            if meshes["dp_replicate"].size() > 1 else "")
                   + " (CPU offload)" * offload)
    return applied
