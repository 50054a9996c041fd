"""--job.dry_run: what a run would be, without a process group or any real allocation.

Prints the mesh (degrees and the flattened dims each job uses); the model's shape, parameter counts
and per-block list of what a run applies (the model is built on the meta device with only tiled MLP
and AC applied; TP, CP, offload, compile and FSDP2 are named, not applied); the tokens per rank; and
the memory estimate of memory_model/memory_report (for CUDA GPUs, whatever this machine has: a dry run
plans a GPU run).
"""

from __future__ import annotations

import torch

from torchtitan_sp.config import Config
from torchtitan_sp.memory_model import Setup, param_counts
from torchtitan_sp.memory_report import DEFAULT_GPU_MEM_GIB, report
from torchtitan_sp.models.llama3 import Transformer
from torchtitan_sp.models.shape import model_args, rope_text
from torchtitan_sp.parallel_dims import ParallelDims
from torchtitan_sp.parallelize.ac import apply_ac
from torchtitan_sp.parallelize.memory import apply_tiled_mlp


def mesh_lines(dims: ParallelDims) -> list[str]:
    """The mesh that ParallelDims.build_mesh would make, in words."""
    lines = [f"mesh (dp_replicate, dp_shard, cp, tp) = ({dims.dp_replicate}, {dims.dp_shard}, {dims.cp}, {dims.tp})",
             f"  dp = dp_replicate x dp_shard = {dims.dp}: ranks that read different samples (batch sharding)",
             f"  dp_shard_cp = dp_shard x cp = {dims.dp_shard * dims.cp}: FSDP2 shards parameters, gradients "
             f"and optimizer states over it",
             f"  dp_cp = dp_replicate x dp_shard x cp = {dims.dp * dims.cp}: loss and valid-token all-reduces"]
    if dims.dp_replicate > 1:
        lines.append(f"  hsdp = (dp_replicate {dims.dp_replicate}, dp_shard_cp {dims.dp_shard * dims.cp}): "
                     "HSDP replicates over the first, shards over the second")
    if dims.cp > 1:
        lines.append(f"  cp = {dims.cp}: ranks that split each sequence (context-parallel attention)")
    if dims.tp > 1:
        lines.append(f"  tp = {dims.tp}: tensor + sequence parallel within each block")
    return lines


def dry_run(cfg: Config, dims: ParallelDims) -> None:
    """Print the run's shape and memory; `cfg` and `dims` are already validated."""
    t, ac = cfg.training, cfg.activation_checkpoint
    print(f"dry run of {cfg.job.config_file or 'the default config'} for world size {dims.world_size} "
          "(WORLD_SIZE; run_train.sh sets it from NGPU)")
    for line in mesh_lines(dims):
        print(line)

    args = model_args(cfg.model)
    with torch.device("meta"):  # no storage: an 8B model costs nothing here
        model = Transformer(args)
        tiled = apply_tiled_mlp(model, ac.tiled_mlp_shards)
        if ac.mode != "none":
            apply_ac(model, ac)
    n, n_root, n_block = param_counts(args)
    assert n == sum(p.numel() for p in model.parameters())
    print(f"model: Llama 3 {cfg.model.flavor}, {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads "
          f"({args.n_kv_heads} KV), ffn {args.ffn_hidden}, vocab {args.vocab_size}, {rope_text(args)}")
    print(f"  parameters {n:,} ({n - args.vocab_size * args.dim:,} without the embedding): "
          f"{n_block:,} per block, {n_root:,} in embedding + output + final norm")
    shard = dims.dp_shard * dims.cp * dims.tp
    print(f"  per rank after FSDP2{' and TP' if dims.tp > 1 else ''} (/ {shard}): {n / shard:,.0f}")
    p = cfg.parallelism
    applied = ([f"TP-SP {dims.tp}"] * (dims.tp > 1)
               + [f"CP {p.context_parallel_strategy} {dims.cp} (replaces inner_attention)"] * (dims.cp > 1)
               + [f"tiled MLP ({ac.tiled_mlp_shards} tiles)"] * tiled
               + [f"AC {ac.mode} ({type(model.layers['0']).__name__})"] * (ac.mode != "none")
               + ["activation offload"] * (ac.offload and ac.mode == "full")
               + ["torch.compile"] * cfg.compile.enable + [f"FSDP2 over {dims.dp_shard * dims.cp}"])
    print(f"  per block: {', '.join(applied)}")

    accum = dims.grad_accum_steps(cfg)
    per_rank = t.local_batch_size * t.seq_len // dims.cp
    print(f"tokens: seq_len {t.seq_len:,} x local batch {t.local_batch_size} per dp rank; "
          f"{per_rank:,} per rank in attention (/ cp {dims.cp})"
          + (f", {per_rank // dims.tp:,} between blocks (/ tp {dims.tp})" if dims.tp > 1 else "")
          + f"; {t.local_batch_size * t.seq_len * dims.dp * accum:,} per optimizer step "
          f"(dp {dims.dp} x grad accumulation {accum})")
    s = Setup.from_config(cfg, dims, "cuda")  # a dry run plans a GPU run, whatever this machine has
    assumed = (f"memory estimate for CUDA GPUs of {DEFAULT_GPU_MEM_GIB:g} GiB, compute in "
               f"{'bf16' if s.b == 2 else 'fp32'} (training.mixed_precision_param)")
    if not torch.cuda.is_available():  # the trainer's start-up line here estimates the CPU run instead
        assumed += ("; no GPU here: a run on this machine computes in fp32 on CPU, estimated by `python -m "
                    f"torchtitan_sp.estimate --device cpu --world_size {dims.world_size}` with the same arguments")
    print(assumed)
    print(report(s, accum, p.fsdp_reshard_after_forward, dims.world_size))
