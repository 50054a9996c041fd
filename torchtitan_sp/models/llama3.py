"""Llama 3: GQA attention with RoPE on explicit position ids, RMSNorm, SwiGLU feed-forward.

Weights follow Meta's layout (RoPE rotates adjacent pairs): Meta's original checkpoints map one to
one; Hugging Face's store q/k rows permuted for rotate-half RoPE (models/hf.py converts both ways).
Llama 3.1/3.2 also need their RoPE frequency scaling (`rope_scaling` llama3) and 3.2 1B/3B their tied
embeddings, both part of ModelArgs and of the published flavors below. The attention math on local
tokens lives in `Attention.inner_attention`, the one module that context-parallel strategies replace.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan_sp.attention.local import LocalAttention


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    ffn_dim: int = 0  # explicit feed-forward hidden size (config.json's intermediate_size); 0 = from multiple_of
    max_position_embeddings: int = 8192  # the context the weights were trained for (HF export, seq_len warning)
    tie_word_embeddings: bool = False  # output projection shares the embedding's weight (Llama 3.2 1B/3B)
    # RoPE frequency scaling as transformers' ROPE_INIT_FUNCTIONS: none | llama3 | yarn | linear
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # llama3/yarn/linear: context extension factor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 8192  # llama3/yarn: context before the extension
    rope_yarn_beta_fast: float = 32.0  # yarn
    rope_yarn_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0 = 0.1 ln(factor) + 1 (transformers' default)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# The published models, as their Hugging Face config.json files say: Llama 3.2 1B/3B (tied embeddings,
# RoPE llama3 scaling x32) and Llama 3.1 8B/70B/405B (x8), all for 131072 tokens; `debug` trains on CPU in seconds.
_LLAMA31 = dict(rope_scaling="llama3", rope_factor=8.0, max_position_embeddings=131072)
_LLAMA32 = dict(rope_scaling="llama3", rope_factor=32.0, max_position_embeddings=131072, tie_word_embeddings=True)
FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=2048,
                       multiple_of=64, ffn_dim_multiplier=None),
    "1B": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                    **_LLAMA32),
    "3B": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
                    **_LLAMA32),
    "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
                    **_LLAMA31),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
                     **_LLAMA31),
    "405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2,
                      **_LLAMA31),
}


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale, as transformers' ROPE_INIT_FUNCTIONS
    computes them for the same rope_type (same operations, so the tables agree to float32 rounding)."""
    hd, base = args.head_dim, args.rope_theta
    exponents = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd
    inv_freq = 1.0 / (base ** exponents)
    kind, factor = args.rope_scaling, args.rope_factor
    if kind == "none":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":  # Llama 3.1: long wavelengths / factor, short kept, a smooth blend between
        old = args.rope_original_max_position
        low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # interpolate long wavelengths, extrapolate short ones, ramp between (truncated range)
        def correction_dim(rotations: float) -> float:
            return hd * math.log(args.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(args.rope_yarn_beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.rope_yarn_beta_slow)), hd - 1)
        ramp = (torch.arange(hd // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high else high) - low)
        extrapolation = 1 - ramp.clamp(0, 1).to(device)
        pos_freqs = base ** (torch.arange(0, hd, 2, device=device).float() / hd)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        attention = args.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv_freq, attention
    raise ValueError(f"rope_scaling {kind!r}: none | llama3 | yarn | linear")


def rope_angles(positions: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, S, head_dim/2) for integer positions (B, S); yarn scales both."""
    inv_freq, scale = rope_inv_freq(args, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, S, H, D) by the angles (B, S, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.inner_attention: nn.Module = LocalAttention()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1: the local number of heads under tensor parallelism
        q = self.wq(x).view(bs, seqlen, -1, self.head_dim)  # (B, S, H, D)
        k = self.wk(x).view(bs, seqlen, -1, self.head_dim)  # (B, S, Hkv, D)
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.inner_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), document_ids)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))  # (B, S, dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, document_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keeps layer names stable when blocks are wrapped (AC, compile) or dropped.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tied embeddings, one Parameter under two names (HF files store it as embed_tokens only).
        Again after `to_empty` on an unsharded model: it materializes each name's parameter apart."""
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, S, dim): what the output projection reads."""
        cos, sin = rope_angles(positions, self.args)
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        for layer in self.layers.values():
            h = layer(h, cos, sin, document_ids)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, S, vocab) for tokens (B, S) at RoPE positions (B, S)."""
        return self.output(self.hidden_states(tokens, positions, document_ids))


def _canonical(name: str) -> str:
    """Parameter name without the wrappers AC and compile add, so init is the same however wrapped."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise every parameter from a generator seeded by (seed, parameter name).

    Each rank draws the full tensor and keeps its own shard, so a model sharded by FSDP, TP or
    any mesh starts from exactly the weights of a single-process model with the same seed.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    args = model.args
    for name, param in model.named_parameters():
        cname = _canonical(name)
        device = param.device
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(cname.encode()))
        full = torch.empty(param.shape, dtype=torch.float32, device=device)
        if "norm" in cname:
            full.fill_(1.0)
        elif cname.startswith("tok_embeddings") and not args.tie_word_embeddings:
            nn.init.normal_(full, std=1.0, generator=gen)
        elif cname.startswith(("output", "tok_embeddings")):  # tied: the output's scale (logits of O(1))
            std = args.dim ** -0.5
            nn.init.trunc_normal_(full, std=std, a=-3 * std, b=3 * std, generator=gen)
        else:
            std = 0.02
            if cname.endswith(("wo.weight", "w2.weight", "w3.weight")):  # depth-scaled init
                std = 0.02 / math.sqrt(2 * (int(cname.split(".")[1]) + 1))
            nn.init.trunc_normal_(full, std=std, a=-2 * std, b=2 * std, generator=gen)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
