"""Llama 3: GQA attention with RoPE on explicit position ids, RMSNorm, SwiGLU feed-forward.

Weights follow Meta's layout (RoPE rotates adjacent pairs), so Meta checkpoints map one to one.
The attention math on local tokens lives in `Attention.inner_attention`, the one module that
context-parallel strategies replace.
"""

from __future__ import annotations

import dataclasses
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# Published Llama 3 / 3.1 / 3.2 shapes; `debug` trains on CPU in seconds.
FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=2048,
                       multiple_of=64, ffn_dim_multiplier=None),
    "1B": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5),
    "3B": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0),
    "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2),
}


def model_args(flavor: str, n_layers: int = 0) -> ModelArgs:
    """The flavor's shape with `n_layers` blocks if given (0 = the flavor's): fewer cut it, more deepen it."""
    args = FLAVORS[flavor]
    return dataclasses.replace(args, n_layers=n_layers) if n_layers else args


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, S, head_dim/2) for integer positions (B, S)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


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

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, S, dim): what the output projection reads."""
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
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
        elif cname.startswith("tok_embeddings"):
            nn.init.normal_(full, std=1.0, generator=gen)
        elif cname.startswith("output"):
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
