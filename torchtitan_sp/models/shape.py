"""The model shape a run's [model] section resolves to: every caller gets it from `model_args`.

Start from the flavor (FLAVORS) or, with flavor hf, from hf_assets_path's config.json; cut or deepen
to model.n_layers; then each rope_* key that is set (non-zero / non-empty) replaces the value.
Switching rope_scaling to another type starts that type's parameters from their defaults
(transformers' for the type; rope_original_max_position: the model's max_position_embeddings) and
needs rope_factor. A rope key the resulting type does not read is an error (it would do nothing).
"""

from __future__ import annotations

import dataclasses
import math

from torchtitan_sp.config import Config, ConfigError, Model, resolve_repo_path
from torchtitan_sp.models.hf import read_hf_config
from torchtitan_sp.models.llama3 import FLAVORS, ModelArgs

ROPE_TYPES = ("none", "llama3", "yarn", "linear")
# rope key -> the scaling types that read it (rope_theta: every type)
ROPE_KEYS = {"rope_factor": ("llama3", "yarn", "linear"), "rope_low_freq_factor": ("llama3",),
             "rope_high_freq_factor": ("llama3",), "rope_original_max_position": ("llama3", "yarn"),
             "rope_yarn_beta_fast": ("yarn",), "rope_yarn_beta_slow": ("yarn",), "rope_attention_factor": ("yarn",)}


def _check_ranges(m: Model) -> None:
    if m.rope_scaling not in ("", *ROPE_TYPES):
        raise ConfigError(f"model.rope_scaling: {m.rope_scaling!r} is not valid; choose one of "
                          f"{' | '.join(ROPE_TYPES)} (unset: the flavor's)")
    for key in ("rope_theta", *ROPE_KEYS):
        value = getattr(m, key)
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"model.{key}: must be >= 0 (0 = the flavor's), got {value}")
    if 0 < m.rope_factor < 1:
        raise ConfigError(f"model.rope_factor: must be >= 1 (0 = the flavor's), got {m.rope_factor}")
    if m.flavor == "hf" and not m.hf_assets_path:
        raise ConfigError("model.flavor hf: set model.hf_assets_path to a Hugging Face Llama folder (with config.json)")


def model_args(m: Model) -> ModelArgs:
    """The run's model shape (see the module docstring); ConfigError with one line on a bad key."""
    _check_ranges(m)
    base = read_hf_config(resolve_repo_path(m.hf_assets_path)) if m.flavor == "hf" else FLAVORS[m.flavor]
    if m.n_layers:
        base = dataclasses.replace(base, n_layers=m.n_layers)
    kind = m.rope_scaling or base.rope_scaling
    source = "config.json" if m.flavor == "hf" else f"flavor {m.flavor}"
    for key, readers in ROPE_KEYS.items():
        if getattr(m, key) and kind not in readers:
            raise ConfigError(f"model.{key}: has no effect with rope_scaling {kind!r}"
                              + (f" (the {source}'s)" if not m.rope_scaling else "")
                              + f"; it applies to {' | '.join(readers)}")
    args = base
    if kind != base.rope_scaling:
        if kind != "none" and not m.rope_factor:
            raise ConfigError(f"model.rope_scaling {kind}: set model.rope_factor (the {source} uses "
                              f"{base.rope_scaling!r} scaling)")
        fresh = {key: getattr(ModelArgs(), key) for key in ROPE_KEYS}
        fresh["rope_original_max_position"] = base.max_position_embeddings
        args = dataclasses.replace(base, rope_scaling=kind, **fresh)
    overrides = {key: getattr(m, key) for key in ("rope_theta", *ROPE_KEYS) if getattr(m, key)}
    args = dataclasses.replace(args, **overrides)
    if args.rope_scaling == "llama3" and args.rope_high_freq_factor <= args.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor {args.rope_high_freq_factor} must exceed "
                          f"rope_low_freq_factor {args.rope_low_freq_factor}")
    return args


def rope_changed(m: Model) -> bool:
    """A rope key is set: the run changes the model's RoPE (to extend its context, presumably)."""
    return bool(m.rope_theta or m.rope_scaling or any(getattr(m, key) for key in ROPE_KEYS))


def context_warning(cfg: Config, args: ModelArgs) -> str | None:
    """Pretrained weights trained on seq_len beyond their context with RoPE unchanged: allowed (extension
    is the point of long-context training) but worth a line."""
    pretrained = bool(cfg.checkpoint.initial_load_path)
    if pretrained and cfg.training.seq_len > args.max_position_embeddings and not rope_changed(cfg.model):
        return (f"training.seq_len {cfg.training.seq_len} exceeds the model's max_position_embeddings "
                f"{args.max_position_embeddings} with its RoPE unchanged (model.rope_theta / rope_scaling / "
                "rope_factor extend it)")
    return None


def check_hf_assets_path(cfg: Config) -> None:
    """model.hf_assets_path is read for the shape (flavor hf), the tokenizer (model.tokenizer_path empty, a
    text dataset) and the export (checkpoint.last_save_in_hf); set with none of them it would do nothing."""
    m = cfg.model
    tokenizer = not m.tokenizer_path and cfg.training.dataset != "synthetic"
    if m.hf_assets_path and m.flavor != "hf" and not tokenizer and not cfg.checkpoint.last_save_in_hf:
        raise ConfigError(f"model.hf_assets_path: nothing reads it here (flavor {m.flavor!r}, "
                          + ("model.tokenizer_path set" if m.tokenizer_path else "synthetic data")
                          + ", no checkpoint.last_save_in_hf); it gives the shape with model.flavor hf, the tokenizer "
                          "when model.tokenizer_path is empty, and the export's config and tokenizer files")


def rope_text(args: ModelArgs) -> str:
    """The RoPE a run uses, for start-up lines: "RoPE theta 500000, llama3 x8 from 8192"."""
    text = f"RoPE theta {args.rope_theta:g}"
    if args.rope_scaling != "none":
        text += f", {args.rope_scaling} x{args.rope_factor:g}"
        if args.rope_scaling != "linear":
            text += f" from {args.rope_original_max_position}"
    return text + (", tied embeddings" if args.tie_word_embeddings else "")
