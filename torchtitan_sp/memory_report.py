"""The estimator's tables and advice, as `python -m torchtitan_sp.estimate` and the dry run print them:
the per-rank breakdown of the peak, what to change when a run does not fit, and the longest seq_len
that fits for each CP strategy and memory option (the arithmetic is memory_model's)."""

from __future__ import annotations

import dataclasses
import os

from torchtitan_sp.attention import GATHERED_FOR_DOCUMENTS, check_cp_attention
from torchtitan_sp.loss import loss_chunk_tokens
from torchtitan_sp.memory_model import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_GIB,
    GIB,
    Setup,
    estimate,
    fits,
    host_bytes,
    loss_bytes,
    max_seq_len,
    seq_len_step,
)
from torchtitan_sp.parallelize.fsdp import reshard_after_forward

DEFAULT_GPU_MEM_GIB = 79.0  # an "80 GB" H100 has 79.1 GiB
# The cards whose seq_len tables the estimator prints by default: GiB torch can use on each.
GPU_MEM_GIB = {"H100 80GB": DEFAULT_GPU_MEM_GIB, "H200 141GB": 139.0}
GPUS_PER_NODE = 8  # ranks sharing one host's memory, when the world size is larger


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 and n else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def cp_label(s: Setup) -> str:
    return s.strategy + {
        "ring": f" (rotate {s.rotate_method})", "usp": f" (ulysses {s.ulysses} x ring {s.cp // s.ulysses})",
        "allgather": f" (heads_k_stride {s.heads_k_stride})", "ulysses": ""}[s.strategy]


def describe(s: Setup) -> str:
    loss = f"chunked ({loss_chunk_tokens(s.args.vocab_size)} tokens per chunk)" if s.chunked_loss else "unchunked"
    cp = "" if s.cp == 1 else f", cp {cp_label(s)}"
    if s.cp > 1 and s.document_masks:
        cp += ", packed documents" + (" (run as allgather, one KV head per stride)"
                                      if s.strategy in GATHERED_FOR_DOCUMENTS else "")
    ac = s.ac_mode + (f" {s.sac_option}" if s.ac_mode == "selective" else "")
    return (f"compute {'bf16' if s.b == 2 else 'fp32'}, AC {ac}, tiled MLP {s.tiles if s.tiles > 1 else 'off'}, "
            f"offload {'on' if s.offload else 'off'}, loss {loss}{cp}" + ", CPU offload" * s.cpu_offload)


def breakdown_text(s: Setup, grad_accum: int = 1) -> str:
    """The per-rank breakdown as printed by the CLI and the dry run."""
    est = estimate(s, grad_accum)
    lines = [f"estimated memory per GPU (GiB), {describe(s)}:"]
    for key, val in est.items():
        if key in ("peak", "peak phase", "phases", "reserved") or key.startswith("host memory"):
            continue
        lines.append(f"  {key:<54}{_gib(val)}")
    lines.append(f"  {'peak of live tensors (' + est['peak phase'] + ')':<54}{_gib(est['peak'])}")
    ctx = f" + {CUDA_CONTEXT_GIB:.1f} GiB CUDA context" if s.device == "cuda" else ""
    lines.append(f"  {f'reserved (+{ALLOCATOR_SLACK:.0%} allocator slack{ctx})':<54}{_gib(est['reserved'])}")
    if s.offload:
        host = est["host memory (offloaded block inputs)"]
        lines.append(f"  {'host memory: offloaded block inputs (pinned)':<54}{_gib(host)}")
    if s.cpu_offload:
        host = est["host memory (parameters, gradients, optimizer states)"]
        lines.append(f"  {'host memory: fp32 shards, gradients, AdamW states':<54}{_gib(host)}")
    if s.chunked_loss:
        plain = estimate(dataclasses.replace(s, chunked_loss=False), grad_accum)
        lines.append(f"  (without the chunked loss: {plain['reserved'] / GIB:.2f} GiB, "
                     f"the loss alone {loss_bytes(dataclasses.replace(s, chunked_loss=False)) / GIB:.2f})")
    return "\n".join(lines)


def cp_strategies(s: Setup) -> list[Setup]:
    """The current setup under each cp strategy that can run it (one local row when cp = 1)."""
    if s.cp == 1:
        return [s]
    a, out = s.args, []
    u = s.ulysses if s.strategy == "usp" else s.cp // 2  # default USP: two Ulysses groups in a ring
    for strategy in ("ring", "ulysses", "usp", "allgather"):
        c = dataclasses.replace(s, strategy=strategy, ulysses=u if strategy == "usp" else 1,
                                heads_k_stride=s.heads_k_stride if strategy == "allgather" else 1)
        try:
            check_cp_attention(strategy, s.cp, c.ulysses, c.heads_k_stride, a.n_heads // s.tp,
                               a.n_kv_heads // s.tp)
        except ValueError:
            continue
        if strategy != "usp" or 1 < u < s.cp:
            out.append(c)
    return out


def memory_options(s: Setup, default_tiles: int = 8) -> dict[str, Setup]:
    """Columns of the max-seq table: AC none / full / full + tiled MLP / + offload / + CPU offload
    (each column adds to the one before; the offloads on GPUs only). No tiled MLP column under TP,
    which does not combine with it."""
    tiles = s.tiles if s.tiles > 1 else default_tiles
    full = dataclasses.replace(s, ac_mode="full", tiles=1, offload=False, cpu_offload=False)
    cols = {"no AC": dataclasses.replace(full, ac_mode="none"), "full AC": full}
    if s.tp == 1:
        full = cols[f"+ tiled MLP {tiles}"] = dataclasses.replace(full, tiles=tiles)
    if s.device == "cuda":
        full = cols["+ offload"] = dataclasses.replace(full, offload=True)
        cols["+ CPU offload"] = dataclasses.replace(full, cpu_offload=True)
    return cols


def max_seq_table(s: Setup, gpu_mem_gib: float, grad_accum: int = 1) -> str:
    lines = [f"longest seq_len within {gpu_mem_gib:g} GiB per GPU (local batch {s.batch}, "
             f"dp_shard {s.dp_shard} x cp {s.cp} x tp {s.tp}):"]
    rows = cp_strategies(s)
    cols = memory_options(s)
    lines.append(f"  {'':<28}" + "".join(f"{c:>18}" for c in cols))
    none_fit = False
    for row in rows:
        name = "local (cp 1)" if s.cp == 1 else cp_label(row)
        vals = [max_seq_len(dataclasses.replace(row, ac_mode=c.ac_mode, tiles=c.tiles, offload=c.offload,
                                                cpu_offload=c.cpu_offload), gpu_mem_gib, grad_accum)
                for c in cols.values()]
        none_fit |= 0 in vals
        lines.append(f"  {name:<28}" + "".join(f"{_tokens(v) if v else '-':>18}" for v in vals))
    if none_fit:
        shortest = seq_len_step(s)
        lines.append(f"  -: does not fit even at the shortest seq_len tried, {shortest:,} (2 x cp x tp x 1024)")
    return "\n".join(lines)


def fit_advice(s: Setup, gpu_mem_gib: float, grad_accum: int, reshard_policy: str) -> str | None:
    """None when the run fits in gpu_mem_gib; else one line: it does not, and each single change the
    estimator finds that makes it fit (memory options, more GPUs, a shorter seq_len)."""
    reserved = estimate(s, grad_accum)["reserved"]
    if reserved <= gpu_mem_gib * GIB:
        return None
    fixes = []
    options = memory_options(s)
    names = list(options)  # "no AC", then full AC and what each further column adds to it
    first = next((i for i in range(1, len(names)) if fits(options[names[i]], gpu_mem_gib, grad_accum)), None)
    if first:
        fixes.append(" ".join(names[1:first + 1]))
        if options[names[first]].cpu_offload:  # the last resort: say what it asks of the host
            host = host_bytes(estimate(options[names[first]], grad_accum))
            fixes[-1] += f" (training.enable_cpu_offload: {host / GIB:.1f} GiB of host memory per rank)"
    for k in (s.dp_shard * 2**j for j in range(1, 11)):  # FSDP shards the fp32 states over dp_shard x cp
        more = dataclasses.replace(s, dp_shard=k, reshard=reshard_after_forward(reshard_policy, k * s.cp,
                                                                                     s.cpu_offload))
        if fits(more, gpu_mem_gib, grad_accum):
            fixes.append(f"more GPUs: dp_shard {k} (world size {s.dp_replicate * k * s.cp * s.tp})")
            break
    if longest := max_seq_len(s, gpu_mem_gib, grad_accum):
        fixes.append(f"seq_len {longest:,}")
    line = f"does not fit: {reserved / GIB:.2f} GiB reserved per GPU > {gpu_mem_gib:g} GiB"
    if not fixes:
        return line + ("; neither full AC, tiled MLP, offload, CPU offload, up to 1024x the GPUs (dp_shard) nor a "
                       "shorter seq_len makes it fit")
    return line + "; it fits with " + ", or ".join(fixes)


def host_mem_gib() -> float:
    """This machine's RAM in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def host_advice(s: Setup, host_mem_gib: float, world_size: int, grad_accum: int = 1) -> str | None:
    """One line on the host memory the run's ranks on one node hold (offloaded block inputs and
    CPU-offloaded states), against host_mem_gib; None when nothing is offloaded."""
    per_rank = host_bytes(estimate(s, grad_accum))
    if not per_rank:
        return None
    ranks = min(world_size, GPUS_PER_NODE)
    total = per_rank * ranks
    line = (f"host memory per node: {ranks} rank{'s' * (ranks > 1)} x {per_rank / GIB:.2f} GiB = "
            f"{total / GIB:.2f} GiB of {host_mem_gib:.1f} GiB")
    if total <= host_mem_gib * GIB:
        return line
    return line + ": does not fit the host; shard the states over more nodes (dp_shard) or offload less"


def report(s: Setup, grad_accum: int, reshard_policy: str, world_size: int, gpu_mem_gib: float | None = None,
           host_mem: float | None = None) -> str:
    """What the estimator CLI and the dry run print: the breakdown, whether it fits the GPU
    (default: an H100) and the host (default: this machine's RAM), and the longest seq_len tables
    for gpu_mem_gib, else for each card of GPU_MEM_GIB."""
    lines = [breakdown_text(s, grad_accum)]
    if advice := fit_advice(s, gpu_mem_gib or DEFAULT_GPU_MEM_GIB, grad_accum, reshard_policy):
        lines.append(advice)
    if host := host_advice(s, host_mem or host_mem_gib(), world_size, grad_accum):
        lines.append(host + ("" if host_mem else " (this machine's RAM; --host_mem_gib for the GPU hosts')"))
    for card, gib in ({f"{gpu_mem_gib:g} GiB": gpu_mem_gib} if gpu_mem_gib else GPU_MEM_GIB).items():
        lines.append(f"[{card}] " + max_seq_table(s, gib, grad_accum))
    return "\n".join(lines)
