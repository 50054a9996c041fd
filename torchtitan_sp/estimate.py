"""Per-GPU memory of a run, from the model shape and the parallel degrees, without running it.

`python -m torchtitan_sp.estimate` (USAGE below) prints the breakdown of the peak (steady state:
optimizer states exist), what to change when it does not fit in --gpu_mem_gib, and the longest
seq_len that fits for each CP strategy and memory option. `dry_run` reuses `estimate`.

The model of the peak (bytes per rank; T = local_batch x seq_len / cp tokens, b = bytes of the
compute dtype, d / dkv / F = dim / KV width / ffn hidden, tp divides what it shards):
- FSDP2 over dp_shard x cp: fp32 parameters, fp32 gradients and AdamW's two fp32 states, all sharded
  (16 B per parameter / shard). Unsharded compute copies: the root (embeddings, output, final norm)
  stays unsharded from forward to the end of backward; two blocks (current + prefetched) at a time
  (every block when FSDP spans one rank and does not reshard); in backward also one block's
  unsharded gradients and the fp32 reduce-scatter input.
- Activations: what autograd saves, read off the ops of models/llama3.py (see `layer_saved`):
  without AC b(6d + 2dkv + 4F) + 4H + small per token and layer (~168 KB for Llama-3-8B in bf16;
  TorchTitan's model, which also keeps fp32 RoPE copies, measured ~0.19 MB). Full AC keeps the block
  input (b d) per layer, and backward recomputes one block at a time. Tiled MLP drops the 4bF
  feed-forward intermediates to one tile's worth; offload moves the block inputs to host memory.
- Loss: chunked (loss.py) holds a few fp32 (chunk x vocab) buffers; unchunked, the logits and
  their gradient in fp32 (0.5 MB per token each for Llama 3); compiled, two 16-bit copies instead.
- Attention: transient buffers of the cp strategy for one layer (gathered or rotated K/V,
  all-to-all buffers, fp32 merge/gradient accumulators).
- Reserved: + ALLOCATOR_SLACK of the peak for fragmentation, + CUDA_CONTEXT_GIB outside torch's allocator.
Validated on CPU against live tensor bytes (tests/test_estimate.py, LiveTensorBytes below); on a
GPU against torch.cuda.max_memory_allocated by scripts/bench_memory.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torchtitan_sp.attention import GATHERED_FOR_DOCUMENTS, check_cp_attention
from torchtitan_sp.config import Config, ConfigError, load_config
from torchtitan_sp.loss import loss_chunk_tokens, loss_is_chunked
from torchtitan_sp.parallelize.fsdp import reshard_after_forward
from torchtitan_sp.models.llama3 import ModelArgs
from torchtitan_sp.models.shape import model_args
from torchtitan_sp.parallel_dims import ParallelDims

GIB = 2**30
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation over the peak of live tensors
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers: outside the allocator
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
DEFAULT_GPU_MEM_GIB = 79.0  # an "80 GB" H100 has 79.1 GiB
DEFAULT_WORLD_SIZE = 8  # one node, when neither the recipe's degrees nor WORLD_SIZE give it
USAGE = f"""usage: python -m torchtitan_sp.estimate [--config NAME.toml] [--section.key value ...]
                                       [--world_size N] [--gpu_mem_gib G] [--device cuda|cpu]
  --world_size N   ranks of the run (default: the recipe's degrees; with data_parallel_shard_degree = -1
                   WORLD_SIZE, else {DEFAULT_WORLD_SIZE})
  --gpu_mem_gib G  GiB per GPU for the fit check and the seq_len table (default {DEFAULT_GPU_MEM_GIB:g}: an 80 GB H100)
  --device D       cuda: compute in training.mixed_precision_param (default); cpu: fp32, as the trainer on CPU
config keys (--section.key value): ./run_train.sh --help"""


@dataclass(frozen=True)
class Setup:
    """Everything the arithmetic reads: the model shape, one rank's share, the memory options."""
    args: ModelArgs
    batch: int
    seq_len: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    strategy: str
    rotate_method: str
    ulysses: int
    heads_k_stride: int
    ac_mode: str
    sac_option: str
    tiles: int
    offload: bool
    chunked_loss: bool
    compiled_loss: bool
    loss_parallel: bool  # TP shards the logits over the vocabulary (else every rank holds them all)
    document_masks: bool  # packed documents: ring and usp then gather K/V (attention/torch_ring.py)
    reshard: bool  # FSDP frees blocks' unsharded parameters after forward
    b: int  # bytes of the compute dtype (parameters as FSDP all-gathers them, activations)
    device: str
    optimizer: str

    @classmethod
    def from_config(cls, cfg: Config, dims: ParallelDims, device: str = "cuda") -> "Setup":
        p, ac = cfg.parallelism, cfg.activation_checkpoint
        return cls(args=model_args(cfg.model), batch=cfg.training.local_batch_size,
                   seq_len=cfg.training.seq_len, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard,
                   cp=dims.cp, tp=dims.tp, strategy=p.context_parallel_strategy,
                   rotate_method=p.context_parallel_rotate_method, ulysses=p.context_parallel_ulysses_degree,
                   heads_k_stride=p.heads_k_stride, ac_mode=ac.mode, sac_option=ac.selective_ac_option,
                   tiles=ac.tiled_mlp_shards if dims.tp == 1 else 1,  # validation rejects tiles with tp
                   offload=ac.offload and ac.mode == "full" and device == "cuda",
                   chunked_loss=loss_is_chunked(cfg.training.local_batch_size * cfg.training.seq_len // dims.cp,
                                                model_args(cfg.model).vocab_size),
                   compiled_loss=cfg.compile.enable and dims.tp == 1,  # as Trainer chooses its cross-entropy
                   loss_parallel=dims.tp > 1 and not p.disable_loss_parallel,
                   document_masks=cfg.training.document_masks,
                   reshard=reshard_after_forward(p.fsdp_reshard_after_forward, dims.dp_shard * dims.cp),
                   b=DTYPE_BYTES[cfg.training.mixed_precision_param] if device == "cuda" else 4,
                   device=device, optimizer=cfg.optimizer.implementation)

    @property
    def tokens(self) -> int:
        """Tokens per rank inside attention and the feed-forward (between blocks: / tp)."""
        return self.batch * self.seq_len // self.cp

    @property
    def fsdp_shard(self) -> int:
        return self.dp_shard * self.cp


def param_counts(args: ModelArgs) -> tuple[int, int, int]:
    """(all parameters, root parameters: embedding + output + final norm, parameters of one block)."""
    d, dkv = args.dim, args.n_kv_heads * args.head_dim
    block = d * (2 * d + 2 * dkv) + 3 * d * args.ffn_hidden + 2 * d
    root = (1 if args.tie_word_embeddings else 2) * args.vocab_size * d + d
    return root + args.n_layers * block, root, block


def _norm_saved(s: Setup) -> float:
    """Bytes per token an RMSNorm saves besides its input: rstd; torch's composite (CPU) rms_norm
    also keeps x * rstd in fp32 (and the fp32 upcast of a 16-bit input). CUDA uses the fused kernel."""
    d = s.args.dim
    return 4 + (0 if s.device == "cuda" else 4 * d + (4 * d if s.b < 4 else 0))


def layer_saved(s: Setup) -> tuple[float, float]:
    """Bytes per token one block saves for backward without AC (on this rank, T tokens), as
    (attention half, feed-forward half).

    attention_norm: its input x (the block input) + stats; wq/wk/wv: the normed x (all-gathered
    under TP); SDPA: q and k after RoPE, v, out, lse (fp32); wo: out (the same storage for local
    SDPA, a copy for cp strategies that return (B, H, S, D)-contiguous outputs). ffn_norm: its input
    h + stats; w1/w3: the normed h; SwiGLU: w1 out, w3 out, silu(w1 out), their product (w2's input).
    """
    a, t, b = s.args, s.tp, s.b
    d, dkv, hd = a.dim, a.n_kv_heads * a.head_dim, a.head_dim
    residual = (b * d + _norm_saved(s)) / t  # x or h, sequence-sharded under TP-SP
    attn = residual + b * d + b * (2 * d + 2 * dkv) / t + 4 * a.n_heads / t  # x, normed, q, out, k, v, lse
    if s.cp > 1 and s.strategy in ("ring", "allgather"):
        attn += b * d / t  # wo's input is a transposed copy of the attention output
    elif s.cp > 1:  # ulysses, usp: the head-sharded q/k/v/out seen by the inner attention, too
        u = s.cp if s.strategy == "ulysses" else s.ulysses
        kv_u = hd * max(a.n_kv_heads, u)  # KV heads replicated when u > n_kv_heads
        attn += b * (2 * d + 2 * kv_u) / t
    ffn = residual + b * d + (0 if s.tiles > 1 else 4 * b * a.ffn_hidden / t)  # h, normed h, SwiGLU
    return attn, ffn


def backward_transients(s: Setup) -> tuple[float, float]:
    """Bytes per token alive on top of the saved tensors while one block runs backward, as
    (attention, feed-forward); they do not overlap (the feed-forward goes first and frees its half).

    Attention holds dq, dk, dv and d_out; the feed-forward two (tokens, F) gradients at once (w2's
    input gradient, then silu's and w3's output gradients; per tile when tiled, plus the tile's
    recomputed intermediates). Both: the gradient of the residual stream; under TP-SP it is
    all-gathered to the full sequence for the block's matmuls, and the gather's buffer, its re-laid
    view and a contiguous copy coexist (measured on CPU: ~3 full-length copies).
    """
    a, t, b = s.args, s.tp, s.b
    f_tile = a.ffn_hidden / t / s.tiles
    ffn = 2 * b * f_tile + (4 * b * f_tile if s.tiles > 1 else 0)
    attn = b * (2 * a.dim + 2 * a.n_kv_heads * a.head_dim) / t
    stream = b * a.dim * (3 if t > 1 else 1)
    return attn + stream, ffn + stream


def _gathered_kv_buffers(s: Setup, stride_heads: float, kv_heads: float) -> float:
    """allgather's backward buffers for one stride of `stride_heads` of the `kv_heads` KV heads a rank attends:
    per K/V element over the whole sequence, the gathered K/V, the next stride's in flight (when
    there is one), a block's K/V copies and their gradients in the compute dtype, and the fp32 dK/dV
    accumulator (the fp32 reduce-scatter buffer comes after the blocks, no larger); per query element
    of the stride's query heads, a block's q, out and d_out copies."""
    a = s.args
    kv_elems = 2 * stride_heads * a.head_dim * s.batch * s.seq_len
    q_elems = stride_heads * (a.n_heads // a.n_kv_heads) * a.head_dim * s.tokens
    prefetch = stride_heads < kv_heads
    return (s.b * (3 + prefetch) + 4) * kv_elems + 3 * s.b * q_elems


def attention_buffers(s: Setup) -> float:
    """Bytes (not per token) of the cp strategy's transient buffers in one layer's backward."""
    a, t, b, T = s.args, s.tp, s.b, s.tokens
    d, dkv, hd = a.dim / t, a.n_kv_heads * a.head_dim / t, a.head_dim
    if s.cp == 1:
        return 0.0
    if s.strategy in GATHERED_FOR_DOCUMENTS:  # ring, or usp's ring part
        u = s.ulysses if s.strategy == "usp" else 1
        kv = dkv * max(a.n_kv_heads, u) / a.n_kv_heads / u  # KV width per rank after the all-to-all
        a2a = b * (d + 2 * kv * u) * T if u > 1 else 0
        if s.document_masks:  # run as allgather's document pieces, one KV head per stride
            return _gathered_kv_buffers(s, 1, max(a.n_kv_heads / t, u) / u) + a2a
        r_tokens, ring = T * u, s.cp // u  # tokens per rank in the ring, ring size
        if ring == 1:  # usp with u = cp: torch's ring over one rank allocates nothing
            return a2a
        kv_comm = 2 * b * kv * (r_tokens * ring if s.rotate_method == "allgather" else 2 * r_tokens)
        # torch's ring backward: dq and dk/dv accumulators in fp32, the fp32 dk/dv rotation
        # (send + receive), one step's dq/dk/dv
        grads = (4 * d / u + 8 * kv + 16 * kv + b * (d / u + 2 * kv)) * r_tokens
        return kv_comm + grads + a2a
    if s.strategy == "ulysses":
        kv_u = hd * max(a.n_kv_heads, s.cp) / t
        return b * (d + 2 * kv_u) * T  # one all-to-all's q/k/v (or their gradients) in flight
    return _gathered_kv_buffers(s, s.heads_k_stride, a.n_kv_heads / t)


def loss_bytes(s: Setup) -> float:
    """Peak transient bytes of the loss (in backward) beyond the hidden states.

    Per row of logits, eager: the recomputed log-softmax output, its gradient and the logits'
    gradient in fp32, and the 16-bit logits' gradient when the output projection runs in bf16.
    Compiled: the logits saved for backward and their gradient, both in the compute dtype.
    Unchunked, the rows are all T tokens (TorchTitan's 15.66 GiB allocation at 32K tokens is one of these).
    """
    rows = s.batch * s.seq_len // s.cp
    if s.chunked_loss:
        rows = min(loss_chunk_tokens(s.args.vocab_size), rows)
    per_logit = 2 * s.b if s.compiled_loss else 12 + (s.b if s.b < 4 else 0)
    return per_logit * rows * s.args.vocab_size / (s.tp if s.loss_parallel else 1)


def estimate(s: Setup, grad_accum: int = 1) -> dict[str, Any]:
    """Bytes per rank by component, the peak of live tensors over the phases of a steady-state step
    (`peak`, `peak phase`) and `reserved` (+ allocator slack and the CUDA context)."""
    a, t, T = s.args, s.tp, s.tokens
    n, n_root, n_block = param_counts(a)
    shard = s.fsdp_shard * t
    residual = s.b * a.dim * T / t  # one block input (sequence-sharded under TP-SP)
    attn_half, ffn_half = layer_saved(s)
    layer, ffn_saved = (attn_half + ffn_half) * T, ffn_half * T
    if s.ac_mode == "full":
        kept, recompute = a.n_layers * residual, layer - residual
    elif s.ac_mode == "selective" and s.sac_option.isdigit():
        every = int(s.sac_option)  # blocks 0, N, 2N, ... are checkpointed (parallelize.ac)
        n_ckpt = math.ceil(a.n_layers / every)
        # Recomputation peaks on the top block's backward only if that block is checkpointed.
        top_recomputes = (a.n_layers - 1) % every == 0
        kept, recompute = n_ckpt * residual + (a.n_layers - n_ckpt) * layer, (layer - residual) * top_recomputes
    elif s.ac_mode == "selective":
        # op-level: the block input and every matmul/attention output are saved (w1/w3 outputs
        # too when tiled: the policy sees the tiles' matmuls), the rest is recomputed. Under TP the
        # outputs of wo and w2 are full-length partial sums (before their reduce-scatter).
        dkv = a.n_kv_heads * a.head_dim
        sac = residual + s.b * (2 * a.dim / t + 2 * a.dim + (2 * dkv + 2 * a.ffn_hidden) / t) * T
        kept, recompute = a.n_layers * sac, max(layer - sac, 0.0)
    else:
        kept, recompute = a.n_layers * layer, 0.0
    host = 0.0
    if s.offload:  # block inputs live on the host; backward brings one back at a time
        kept, recompute, host = kept - a.n_layers * residual, recompute + residual, a.n_layers * residual
    attn_transient, ffn_transient = (x * T for x in backward_transients(s))
    params = grads = 4 * n / shard
    states = 8 * n / shard
    root = s.b * n_root / t
    # Resharded: two blocks unsharded at a time (current + prefetched); else all of them.
    fsdp = ((2 if s.reshard else a.n_layers) * s.b + s.b + 4) * n_block / t
    acts = kept + 4 * a.head_dim * T  # + cos/sin (fp32), shared
    cp_buf = attention_buffers(s)
    final = (2 * s.b * a.dim + _norm_saved(s)) * T / t
    loss = loss_bytes(s)
    out_grad = s.b * a.vocab_size * a.dim / t
    out: dict[str, Any] = {
        "parameters (fp32, sharded)": params,
        "gradients (fp32, sharded)": grads,
        "optimizer states (AdamW, fp32, sharded)": states,
        "root unsharded (embedding, output)": root,
        "FSDP block buffers (unsharded, grads, reduce-scatter)": fsdp,
        "activations kept (all layers)": acts,
        "one block recomputed in backward": recompute,
        "backward transient: feed-forward": ffn_transient,
        "backward transient: attention": attn_transient,
        "attention/cp buffers (one layer)": cp_buf,
        "final norm + hidden states": final,
        "loss (one chunk, backward)" if s.chunked_loss else "loss (all logits, backward)": loss,
        "output-projection gradient (unsharded)": out_grad,
    }
    # Gradients are set to None after each step: during forward/backward they exist only when
    # accumulating over micro-batches (the top block's backward comes before any block's grads).
    static = params + states + (grads if grad_accum > 1 else 0)
    top = static + root + fsdp + acts + recompute + out_grad
    phases = {
        "loss backward": static + root + acts + final + loss + out_grad + 2 * residual,
        "top block backward, feed-forward": top + ffn_transient,
        "top block backward, attention": top - ffn_saved + attn_transient + cp_buf,
        "end of backward": params + states + grads + root + 2 * out_grad + 4 * n_root / t,
        "optimizer step": params + states + grads + (4 * n / shard if s.optimizer == "foreach" else 0),
    }
    phase = max(phases, key=phases.get)
    out["peak"], out["peak phase"], out["phases"] = phases[phase], phase, phases
    out["reserved"] = out["peak"] * (1 + ALLOCATOR_SLACK) + (CUDA_CONTEXT_GIB * GIB if s.device == "cuda" else 0)
    out["host memory (offloaded block inputs)"] = host
    return out


def fits(s: Setup, gpu_mem_gib: float, grad_accum: int = 1) -> bool:
    return estimate(s, grad_accum)["reserved"] <= gpu_mem_gib * GIB


def seq_len_step(s: Setup) -> int:
    """The seq_len grid of max_seq_len: what head-tail sharding over cp x tp needs, in 1K units."""
    return 2 * s.cp * s.tp * 1024


def max_seq_len(s: Setup, gpu_mem_gib: float, grad_accum: int = 1) -> int:
    """Longest seq_len (a multiple of seq_len_step) whose estimate fits; 0 if none does."""
    step = seq_len_step(s)
    lo, hi = 0, 1
    while fits(dataclasses.replace(s, seq_len=hi * step), gpu_mem_gib, grad_accum) and hi < 2**20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # estimate() grows with seq_len: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(dataclasses.replace(s, seq_len=mid * step), gpu_mem_gib, grad_accum) else (lo, mid)
    return lo * step


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
            f"offload {'on' if s.offload else 'off'}, loss {loss}{cp}")


def breakdown_text(s: Setup, grad_accum: int = 1) -> str:
    """The per-rank breakdown as printed by the CLI and the dry run."""
    est = estimate(s, grad_accum)
    lines = [f"estimated memory per GPU (GiB), {describe(s)}:"]
    for key, val in est.items():
        if key in ("peak", "peak phase", "phases", "reserved", "host memory (offloaded block inputs)"):
            continue
        lines.append(f"  {key:<54}{_gib(val)}")
    lines.append(f"  {'peak of live tensors (' + est['peak phase'] + ')':<54}{_gib(est['peak'])}")
    ctx = f" + {CUDA_CONTEXT_GIB:.1f} GiB CUDA context" if s.device == "cuda" else ""
    lines.append(f"  {f'reserved (+{ALLOCATOR_SLACK:.0%} allocator slack{ctx})':<54}{_gib(est['reserved'])}")
    if s.offload:
        host = est["host memory (offloaded block inputs)"]
        lines.append(f"  {'host memory: offloaded block inputs (pinned)':<54}{_gib(host)}")
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
    """Columns of the max-seq table: AC none / full / full + tiled MLP / + offload (each column adds
    to the one before). No tiled MLP column under TP, which does not combine with it."""
    tiles = s.tiles if s.tiles > 1 else default_tiles
    full = dataclasses.replace(s, ac_mode="full", tiles=1, offload=False)
    cols = {"no AC": dataclasses.replace(full, ac_mode="none"), "full AC": full}
    if s.tp == 1:
        full = cols[f"+ tiled MLP {tiles}"] = dataclasses.replace(full, tiles=tiles)
    cols["+ offload"] = dataclasses.replace(full, offload=s.device == "cuda")
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
        vals = [max_seq_len(dataclasses.replace(row, ac_mode=c.ac_mode, tiles=c.tiles, offload=c.offload),
                            gpu_mem_gib, grad_accum) for c in cols.values()]
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
    for k in (s.dp_shard * 2**j for j in range(1, 11)):  # FSDP shards the fp32 states over dp_shard x cp
        more = dataclasses.replace(s, dp_shard=k, reshard=reshard_after_forward(reshard_policy, k * s.cp))
        if fits(more, gpu_mem_gib, grad_accum):
            fixes.append(f"more GPUs: dp_shard {k} (world size {s.dp_replicate * k * s.cp * s.tp})")
            break
    if longest := max_seq_len(s, gpu_mem_gib, grad_accum):
        fixes.append(f"seq_len {longest:,}")
    line = f"does not fit: {reserved / GIB:.2f} GiB reserved per GPU > {gpu_mem_gib:g} GiB"
    if not fixes:
        return line + ("; neither full AC, tiled MLP, offload, up to 1024x the GPUs (dp_shard) nor a shorter "
                       "seq_len makes it fit")
    return line + "; it fits with " + ", or ".join(fixes)


def default_world_size(cfg: Config) -> int:
    """The recipe's own world size when its degrees say it, else WORLD_SIZE, else one 8-GPU node."""
    p = cfg.parallelism
    if p.data_parallel_shard_degree > 0:
        return (p.data_parallel_replicate_degree * p.data_parallel_shard_degree * p.context_parallel_degree
                * p.tensor_parallel_degree)
    return int(os.environ.get("WORLD_SIZE", DEFAULT_WORLD_SIZE))


def parse_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The estimator's own options, and the rest of argv for load_config; ConfigError on a bad one."""
    opts: dict[str, Any] = {"world_size": None, "gpu_mem_gib": DEFAULT_GPU_MEM_GIB, "device": "cuda"}
    rest, i = [], 0
    while i < len(argv):
        name, eq, val = argv[i].partition("=")
        key = name[2:]
        if not name.startswith("--") or "." in key or key == "config":
            rest.append(argv[i])
            i += 1
            continue
        if key not in opts:  # load_config would only say "options are --section.key"
            raise ConfigError(f"{name}: unknown option; the estimator's are --world_size N, --gpu_mem_gib G, "
                              "--device cuda|cpu (--help), config keys are --section.key value")
        if not eq:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{name}: needs a value")
            val, i = argv[i + 1], i + 1
        opts[key] = _option_value(key, val)
        i += 1
    return opts, rest


def _option_value(key: str, val: str) -> int | float | str:
    if key == "device":
        if val not in ("cuda", "cpu"):
            raise ConfigError(f"--device: {val!r} is not valid; choose one of cuda | cpu")
        return val
    try:
        num = int(val) if key == "world_size" else float(val)
        if num > 0 and math.isfinite(num):
            return num
    except ValueError:
        pass
    kind = "integer (ranks of the run)" if key == "world_size" else "number (GiB per GPU)"
    raise ConfigError(f"--{key}: expected a positive {kind}, got {val!r}")


def world_size_note(cfg: Config) -> str | None:
    """How the world size was chosen when the recipe leaves it open (data_parallel_shard_degree = -1)."""
    if cfg.parallelism.data_parallel_shard_degree > 0:
        return None
    source = "from WORLD_SIZE" if "WORLD_SIZE" in os.environ else f"assumed (one {DEFAULT_WORLD_SIZE}-GPU node)"
    return (f"world size {default_world_size(cfg)} {source}: the recipe's data_parallel_shard_degree = -1 takes "
            "whatever world size the run has; set it with --world_size N")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        sys.exit(0)
    from torchtitan_sp.validate import validate

    try:
        opts, argv = parse_options(argv)
        cfg = load_config(argv)
        world = opts["world_size"] or default_world_size(cfg)
        dims = validate(cfg, world)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s, accum = Setup.from_config(cfg, dims, opts["device"]), dims.grad_accum_steps(cfg)
    note = None if opts["world_size"] else world_size_note(cfg)
    n, _, _ = param_counts(s.args)
    print(f"Llama 3 {cfg.model.flavor}" + (f" with {s.args.n_layers} layers (model.n_layers)" if cfg.model.n_layers else "")
          + f": {n:,} parameters; world size {world}{' (assumed)' if note else ''}: dp_replicate "
          f"{dims.dp_replicate} x dp_shard {dims.dp_shard} x cp {dims.cp} x tp {dims.tp}; seq_len {s.seq_len:,} "
          f"x local batch {s.batch} -> {s.tokens:,} tokens per rank")
    if note:
        print(note)
    print(breakdown_text(s, accum))
    if advice := fit_advice(s, opts["gpu_mem_gib"], accum, cfg.parallelism.fsdp_reshard_after_forward):
        print(advice)
    print(max_seq_table(s, opts["gpu_mem_gib"], accum))


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages on CPU, where torch has no allocator statistics.

    Every storage an op returns is tracked (weakly) from then on; after each op the live total is
    the sum of the tracked storages' current sizes (FSDP2 frees and re-allocates its unsharded
    parameters by resizing storages in place). Storages made before entering must be added with
    `track` (e.g. the parameters); DTensors count by their local tensor (ops on DTensors are slow
    under a Python mode, so keep e.g. FSDP's optimizer step outside). Memory an op allocates and
    frees internally is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, weakref.ref] = {}
        self.peak = 0

    def track(self, *tensors: Any) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, DTensor):
                t = t._local_tensor
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse:
                st = t.untyped_storage()
                key = id(st)
                if key not in self._storages:
                    self._storages[key] = weakref.ref(st, lambda _, key=key: self._storages.pop(key, None))

    @property
    def live(self) -> int:
        return sum(st.nbytes() for ref in list(self._storages.values()) if (st := ref()) is not None)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.track(out)
        self.peak = max(self.peak, self.live)
        return out


if __name__ == "__main__":
    main()
