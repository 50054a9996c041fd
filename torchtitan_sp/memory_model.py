"""Per-GPU memory of a run, from the model shape and the parallel degrees, without running it.

The arithmetic only: `memory_report` turns it into the tables and advice that
`python -m torchtitan_sp.estimate` and the dry run print; the trainer logs its peak at start-up.

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
  feed-forward intermediates to one tile's worth; offload moves the block inputs to host memory;
  CPU offload (training.enable_cpu_offload) moves the fp32 shards and the optimizer there.
- Loss: chunked (loss.py) holds a few fp32 (chunk x vocab) buffers; unchunked, the logits and
  their gradient in fp32 (0.5 MB per token each for Llama 3); compiled, two 16-bit copies instead.
- Attention: transient buffers of the cp strategy for one layer (gathered or rotated K/V,
  all-to-all buffers, fp32 merge/gradient accumulators).
- Reserved: + ALLOCATOR_SLACK of the peak for fragmentation, + CUDA_CONTEXT_GIB outside torch's allocator.
Validated on CPU against live tensor bytes (tests/test_estimate.py, memory_measure.LiveTensorBytes); on a
GPU against torch.cuda.max_memory_allocated by scripts/bench_memory.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torchtitan_sp.attention import GATHERED_FOR_DOCUMENTS
from torchtitan_sp.config import Config
from torchtitan_sp.loss import loss_chunk_tokens, loss_is_chunked
from torchtitan_sp.models.llama3 import ModelArgs
from torchtitan_sp.models.shape import model_args
from torchtitan_sp.parallel_dims import ParallelDims
from torchtitan_sp.parallelize.fsdp import reshard_after_forward

GIB = 2**30
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation over the peak of live tensors
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers: outside the allocator
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


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
    cpu_offload: bool  # FSDP2 keeps the fp32 shards and AdamW's states in host memory
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
        setup = cls(args=model_args(cfg.model), batch=cfg.training.local_batch_size,
                   seq_len=cfg.training.seq_len, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard,
                   cp=dims.cp, tp=dims.tp, strategy=p.context_parallel_strategy,
                   rotate_method=p.context_parallel_rotate_method, ulysses=p.context_parallel_ulysses_degree,
                   heads_k_stride=p.heads_k_stride, ac_mode=ac.mode, sac_option=ac.selective_ac_option,
                   tiles=ac.tiled_mlp_shards if dims.tp == 1 else 1,  # validation rejects tiles with tp
                   offload=ac.offload and ac.mode == "full" and device == "cuda",
                   cpu_offload=cfg.training.enable_cpu_offload and device == "cuda",
                   chunked_loss=False,  # set by at_seq_len, as the loss decides per micro-batch
                   compiled_loss=cfg.compile.enable and dims.tp == 1,  # as Trainer chooses its cross-entropy
                   loss_parallel=dims.tp > 1 and not p.disable_loss_parallel,
                   document_masks=cfg.training.document_masks,
                   reshard=reshard_after_forward(p.fsdp_reshard_after_forward, dims.dp_shard * dims.cp,
                                                 cfg.training.enable_cpu_offload),
                   b=DTYPE_BYTES[cfg.training.mixed_precision_param] if device == "cuda" else 4,
                   device=device, optimizer=cfg.optimizer.implementation)
        return at_seq_len(setup, setup.seq_len)

    @property
    def tokens(self) -> int:
        """Tokens per rank inside attention and the feed-forward (between blocks: / tp)."""
        return self.batch * self.seq_len // self.cp

    @property
    def fsdp_shard(self) -> int:
        return self.dp_shard * self.cp


def at_seq_len(s: Setup, seq_len: int) -> Setup:
    """`s` at another seq_len; the loss chunks by itself when a micro-batch's logits grow large."""
    return dataclasses.replace(s, seq_len=seq_len,
                               chunked_loss=loss_is_chunked(s.batch * seq_len // s.cp, s.args.vocab_size))


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
    foreach_copy = 4 * n / shard if s.optimizer == "foreach" else 0  # the step's temporary
    root = s.b * n_root / t
    # Resharded: two blocks unsharded at a time (current + prefetched); else all of them.
    fsdp = ((2 if s.reshard else a.n_layers) * s.b + s.b + 4) * n_block / t
    host_states = 0.0
    if s.cpu_offload:  # the optimizer steps on the host; each block's fp32 shard visits the device
        # (and is cast there) for its all-gather, the current and the prefetched block
        host_states = params + grads + states + foreach_copy
        params = grads = states = foreach_copy = 0.0
        fsdp += 2 * (4 + s.b) * n_block / shard
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
        "optimizer step": params + states + grads + foreach_copy,
    }
    phase = max(phases, key=phases.get)
    out["peak"], out["peak phase"], out["phases"] = phases[phase], phase, phases
    out["reserved"] = out["peak"] * (1 + ALLOCATOR_SLACK) + (CUDA_CONTEXT_GIB * GIB if s.device == "cuda" else 0)
    out["host memory (offloaded block inputs)"] = host
    out["host memory (parameters, gradients, optimizer states)"] = host_states
    return out


def host_bytes(est: dict[str, Any]) -> float:
    """Host memory one rank of the run holds (offloaded block inputs, CPU-offloaded states)."""
    return sum(v for k, v in est.items() if k.startswith("host memory"))


def fits(s: Setup, gpu_mem_gib: float, grad_accum: int = 1) -> bool:
    return estimate(s, grad_accum)["reserved"] <= gpu_mem_gib * GIB


def seq_len_step(s: Setup) -> int:
    """The seq_len grid of max_seq_len: what head-tail sharding over cp x tp needs, in 1K units."""
    return 2 * s.cp * s.tp * 1024


def max_seq_len(s: Setup, gpu_mem_gib: float, grad_accum: int = 1) -> int:
    """Longest seq_len (a multiple of seq_len_step) whose estimate fits; 0 if none does."""
    step = seq_len_step(s)
    lo, hi = 0, 1
    while fits(at_seq_len(s, hi * step), gpu_mem_gib, grad_accum) and hi < 2**20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # estimate() grows with seq_len: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(at_seq_len(s, mid * step), gpu_mem_gib, grad_accum) else (lo, mid)
    return lo * step
