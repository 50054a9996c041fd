"""Hugging Face Llama folders: config.json -> ModelArgs (and back), state-dict names and q/k rows both ways.

Names: embed_tokens -> tok_embeddings, q/k/v/o_proj -> wq/wk/wv/wo, gate/up/down_proj -> w1/w3/w2,
input_layernorm -> attention_norm, post_attention_layernorm -> ffn_norm, norm -> norm, lm_head -> output.
HF's q_proj/k_proj rows are permuted for its rotate-half RoPE: within a head of size hd, our row 2i+j
(j in {0, 1}, this model rotates adjacent pairs) is HF's row j*hd/2 + i. A tied model's file has no
lm_head (its output is embed_tokens). Functions work on plain tensors; hf_checkpoint.py does the I/O.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from torchtitan_sp.config import ConfigError
from torchtitan_sp.models.llama3 import ModelArgs

# our name -> HF name, for the parts outside the blocks and inside one block
_ROOT = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
_BLOCK = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
          "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
          "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
          "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight"}
_ROOT_INV = {v: k for k, v in _ROOT.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# config.json's rope_type -> ours ("default" is plain RoPE)
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


def hf_key(our_key: str) -> str:
    """HF name of one of our parameter names (KeyError for a name HF files do not have)."""
    if our_key in _ROOT:
        return _ROOT[our_key]
    m = _OURS_LAYER.fullmatch(our_key)
    if not m or m.group(2) not in _BLOCK:
        raise KeyError(our_key)
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"


def our_key(hf_key: str) -> str:
    """Our name of one HF parameter name (KeyError for a name this model does not have)."""
    if hf_key in _ROOT_INV:
        return _ROOT_INV[hf_key]
    m = _HF_LAYER.fullmatch(hf_key)
    if not m or m.group(2) not in _BLOCK_INV:
        raise KeyError(hf_key)
    return f"layers.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q_proj/k_proj (n_heads*hd, dim) -> our wq/wk: each head's halves interleaved into pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our wq/wk (n_heads*hd, dim) -> HF q_proj/k_proj: each head's pairs split into two halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads(key: str, args: ModelArgs) -> int | None:
    """Heads whose rows a q/k weight holds (None: not a rotated projection)."""
    if key.endswith("attention.wq.weight"):
        return args.n_heads
    if key.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_ours(key: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One HF (name, tensor) as ours."""
    key = our_key(key)
    heads = _heads(key, args)
    return key, tensor if heads is None else unpermute_rows(tensor, heads)


def to_hf(key: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One of our (name, tensor) as HF's."""
    heads = _heads(key, args)
    return hf_key(key), tensor if heads is None else permute_rows(tensor, heads)


def hf_to_ours(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A HF state dict as ours; a tied model's output.weight is its embedding (also when the file has lm_head)."""
    out = dict(to_ours(k, v, args) for k, v in sd.items())
    if args.tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def ours_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state dict as HF's; a tied model has no lm_head.weight."""
    skip = {"output.weight"} if args.tie_word_embeddings else set()
    return dict(to_hf(k, v, args) for k, v in sd.items() if k not in skip)


def _positive(d: dict[str, Any], key: str, default: float | None, path: Path, where: str = "") -> float:
    """d[key] (default when absent or null) as a positive number; ConfigError naming the file and key."""
    value = d.get(key)
    value = default if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{path}: {where}{key} must be a positive number, got {d.get(key)!r}")
    return float(value)


def _rope_args(cfg: dict[str, Any], path: Path, max_positions: int) -> dict[str, Any]:
    """RoPE keys of ModelArgs from the classic layout (top-level rope_theta + rope_scaling) or the
    transformers >= 5 one (rope_parameters); keys that say different things are an error."""
    scaling, params = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: {name} must be an object or null, got {value!r}")
    if scaling and params:  # rope_theta is compared with the top-level one below
        diff = sorted(k for k in set(scaling) & set(params) - {"rope_theta"} if scaling[k] != params[k])
        if diff:
            raise ConfigError(f"{path}: rope_scaling and rope_parameters contradict each other ({diff[0]}: "
                              f"{scaling[diff[0]]!r} vs {params[diff[0]]!r}); keep one of them")
    rope = {**(scaling or {}), **(params or {})}
    thetas = {"rope_theta": cfg["rope_theta"]} if "rope_theta" in cfg else {}
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value and "rope_theta" in value:
            thetas[f"{name}.rope_theta"] = value["rope_theta"]
    if len(set(thetas.values())) > 1:
        raise ConfigError(f"{path}: {' vs '.join(f'{k} {v}' for k, v in thetas.items())}: the RoPE base must "
                          "be given once (or the same everywhere)")
    # 10000: transformers' default_theta
    theta = _positive({"rope_theta": next(iter(thetas.values()), 10000.0)}, "rope_theta", None, path)
    if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
        raise ConfigError(f"{path}: rope type {rope['type']!r} and rope_type {rope['rope_type']!r} "
                          "contradict each other")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{path}: rope_type {kind!r} is not supported; valid: {' | '.join(_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{path}: partial_rotary_factor is not supported (Llama rotates whole heads)")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": _ROPE_TYPES[kind]}
    if kind == "default":
        return out
    where = f"rope_type {kind!r}: "
    out["rope_factor"] = _positive(rope, "factor", None, path, where)
    if kind != "linear":
        out["rope_original_max_position"] = int(_positive(rope, "original_max_position_embeddings", max_positions,
                                                          path, where))
    if kind == "llama3":
        out["rope_low_freq_factor"] = _positive(rope, "low_freq_factor", None, path, where)
        out["rope_high_freq_factor"] = _positive(rope, "high_freq_factor", None, path, where)
        if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
            raise ConfigError(f"{path}: rope high_freq_factor {rope['high_freq_factor']} must exceed "
                              f"low_freq_factor {rope['low_freq_factor']}")
    if kind == "yarn":
        unsupported = [k for k in ("mscale", "mscale_all_dim") if rope.get(k)] + (["truncate"] * (
            rope.get("truncate", True) is False))
        if unsupported:
            raise ConfigError(f"{path}: yarn's {unsupported[0]} is not supported (DeepSeek-style yarn)")
        out["rope_yarn_beta_fast"] = _positive(rope, "beta_fast", 32.0, path, where)  # transformers' defaults
        out["rope_yarn_beta_slow"] = _positive(rope, "beta_slow", 1.0, path, where)
        if rope.get("attention_factor") is not None:
            out["rope_attention_factor"] = _positive(rope, "attention_factor", None, path, where)
    return out


def read_hf_config(folder: str | Path) -> ModelArgs:
    """The shape a Hugging Face Llama folder's config.json describes; ConfigError (one line) otherwise."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"model.hf_assets_path: {folder} is not a folder (a Hugging Face model folder with "
                          "config.json)")
    if not path.is_file():
        raise ConfigError(f"model.hf_assets_path: {folder} has no config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"{path}: model_type {cfg.get('model_type')!r}: only Llama (model_type 'llama') is supported")
    ints = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {cfg.get(key)!r}")
        ints[key] = cfg[key]
    dim, heads = ints["hidden_size"], ints["num_attention_heads"]
    kv_heads = int(_positive(cfg, "num_key_value_heads", heads, path))
    if dim % heads or heads % kv_heads:
        raise ConfigError(f"{path}: hidden_size {dim}, num_attention_heads {heads}, num_key_value_heads {kv_heads}: "
                          "heads must divide hidden_size and KV heads the heads")
    if cfg.get("head_dim") not in (None, dim // heads):
        raise ConfigError(f"{path}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads = {dim // heads} "
                          "is not supported")
    for key, valid in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, valid) != valid:
            raise ConfigError(f"{path}: {key} {cfg[key]!r} is not supported (Llama 3 has {valid!r})")
    max_positions = int(_positive(cfg, "max_position_embeddings", 2048, path))  # LlamaConfig's default
    return ModelArgs(dim=dim, n_layers=ints["num_hidden_layers"], n_heads=heads, n_kv_heads=kv_heads,
                     vocab_size=ints["vocab_size"], ffn_dim=ints["intermediate_size"],
                     norm_eps=_positive(cfg, "rms_norm_eps", 1e-6, path),  # LlamaConfig's default (Llama 3: 1e-5)
                     max_position_embeddings=max_positions,
                     tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     **_rope_args(cfg, path, max_positions))


def hf_config(args: ModelArgs) -> dict[str, Any]:
    """config.json keys describing `args` (classic layout: transformers 4.x and 5.x both read it).
    The export merges them over the source folder's config.json (token ids, dtype)."""
    rope: dict[str, Any] | None = None
    if args.rope_scaling != "none":
        rope = {"rope_type": args.rope_scaling, "factor": args.rope_factor}
        if args.rope_scaling in ("llama3", "yarn"):
            rope["original_max_position_embeddings"] = args.rope_original_max_position
        if args.rope_scaling == "llama3":
            rope.update(low_freq_factor=args.rope_low_freq_factor, high_freq_factor=args.rope_high_freq_factor)
        if args.rope_scaling == "yarn":
            rope.update(beta_fast=args.rope_yarn_beta_fast, beta_slow=args.rope_yarn_beta_slow)
            if args.rope_attention_factor:
                rope["attention_factor"] = args.rope_attention_factor
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "intermediate_size": args.ffn_hidden,
            "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "max_position_embeddings": args.max_position_embeddings,
            "tie_word_embeddings": args.tie_word_embeddings, "rope_theta": args.rope_theta, "rope_scaling": rope}

