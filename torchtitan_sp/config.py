"""Typed run configuration: dataclass sections, TOML recipes, `--section.key value` overrides.

Precedence: command line > TOML recipe > dataclass defaults. Every field carries a one-line
docstring (the string literal under it), which `--help` prints. Unknown sections or keys and
values of the wrong type raise ConfigError, which the entry points turn into one line and exit 2.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "train_configs"
DEFAULT_RECIPE = "debug_model.toml"  # used when no --config is given


class ConfigError(ValueError):
    """A bad recipe or override: the message names the key and what is valid."""


@dataclass
class Job:
    config_file: str = ""
    """TOML recipe; a bare name resolves against train_configs/."""
    dump_folder: str = "./outputs"
    """Folder for config.json, metrics.jsonl, TensorBoard files (tb/) and checkpoints."""
    description: str = ""
    """Free text printed at start-up."""
    dry_run: bool = False
    """Validate, build the mesh shape and the model on the meta device, print sizes and memory; allocate nothing."""


@dataclass
class Model:
    """The shape is the flavor's (with flavor hf: hf_assets_path's config.json); a rope_* key set here
    replaces that value (command line > TOML > flavor / config.json; 0 or "" = keep it). models/shape.py."""

    name: str = "llama3"
    """Model family (only llama3)."""
    flavor: str = "debug"
    """Shape: debug | 1B | 3B (Llama 3.2) | 8B | 70B | 405B (Llama 3.1) | hf (config.json of model.hf_assets_path)."""
    hf_assets_path: str = ""
    """Hugging Face Llama folder: the shape with flavor hf; also the tokenizer and the HF export's files."""
    n_layers: int = 0
    """Blocks (0 = the flavor's): fewer keep the flavor's first N, more deepen it with blocks of the same shape."""
    rope_theta: float = 0.0
    """RoPE base (0 = the flavor's, or config.json's with flavor hf); raise it to extend the context."""
    rope_scaling: str = ""
    """RoPE frequency scaling: none | llama3 | yarn | linear ("" = the flavor's / config.json's)."""
    rope_factor: float = 0.0
    """llama3 | yarn | linear: context extension factor >= 1 (0 = the flavor's; needed to change the type)."""
    rope_low_freq_factor: float = 0.0
    """llama3: wavelengths above original_max_position / this are divided by rope_factor (0 = the flavor's, else 1)."""
    rope_high_freq_factor: float = 0.0
    """llama3: wavelengths below original_max_position / this stay unscaled (0 = the flavor's, else 4)."""
    rope_original_max_position: int = 0
    """llama3 | yarn: context length before the extension (0 = the flavor's, else its max_position_embeddings)."""
    rope_yarn_beta_fast: float = 0.0
    """yarn: rotations below which frequencies are interpolated fully (0 = the flavor's, else 32)."""
    rope_yarn_beta_slow: float = 0.0
    """yarn: rotations above which frequencies are kept (0 = the flavor's, else 1)."""
    rope_attention_factor: float = 0.0
    """yarn: scale of cos and sin (0 = the flavor's, else 0.1 ln(rope_factor) + 1)."""
    tokenizer_path: str = ""
    """tiktoken ranks file (Llama 3 tokenizer.model) or HF tokenizer.json; "" = hf_assets_path's tokenizer.json, else its original/tokenizer.model, else assets/tokenizer/tokenizer.model."""  # noqa: E501


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Optimizer (only AdamW)."""
    lr: float = 8e-4
    """Peak of the schedule (warmup climbs towards it, decay starts from it)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    implementation: str = "fused"
    """AdamW kernel: fused (clips and skips non-finite steps inside the kernel) | foreach | for-loop."""


@dataclass
class LRScheduler:
    warmup_steps: int = 2
    """Linear warmup steps: step k (from 1) runs at lr x k/(warmup_steps+1)."""
    decay_type: str = "linear"
    """Decay after warmup: linear | cosine | none."""
    min_lr_factor: float = 0.0
    """The last step's lr as a fraction of lr (linear/cosine decay only)."""


@dataclass
class Training:
    seq_len: int = 256
    """Tokens per sequence (before context-parallel sharding)."""
    local_batch_size: int = 2
    """Sequences per data-parallel rank per micro-batch (ranks of one cp/tp group share them)."""
    global_batch_size: int = -1
    """Sequences per optimizer step; -1 = local_batch_size x dp degree. Larger values accumulate gradients."""
    steps: int = 20
    """Optimizer steps."""
    max_norm: float = 1.0
    """Gradient clipping norm (<= 0 disables)."""
    dataset: str = "synthetic"
    """Data source: synthetic | stdlib (this interpreter's standard library) | files | chat (training.dataset_path)."""
    dataset_path: str = ""
    """File, folder or glob (.txt, .jsonl/.json/.parquet: "text", "messages" or "input_ids"; .npy); mixture "a/*:0.6,b:0.4"."""  # noqa: E501
    packing: bool = True
    """Pack documents into seq_len windows with per-document positions and a document-causal mask."""
    train_on_prompt: bool = False
    """chat: also train on system, user and tool turns and headers (default: assistant replies only)."""
    truncation: str = "drop"
    """chat: a conversation longer than seq_len is dropped (drop) or cut to its first seq_len tokens (right)."""
    mixed_precision_param: str = "bfloat16"
    """Parameter dtype for compute on GPU: bfloat16 | float32 (CPU runs always use float32)."""
    mixed_precision_reduce: str = "float32"
    """Gradient reduce dtype: float32 | bfloat16."""
    skip_nonfinite_loss: bool = False
    """Skip an optimizer step whose loss or gradient norm is NaN/inf instead of stopping the run."""
    enable_cpu_offload: bool = False
    """FSDP2 CPU offload: sharded parameters, gradients and AdamW states in host memory; the optimizer steps on the CPU."""  # noqa: E501

    @property
    def document_masks(self) -> bool:
        """Attention is document-causal: packed real text (a synthetic sample is one document)."""
        return self.packing and self.dataset != "synthetic"


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """HSDP replicas (parameters replicated across them)."""
    data_parallel_shard_degree: int = -1
    """FSDP2 shard degree; -1 = the ranks left after the other degrees."""
    context_parallel_degree: int = 1
    """Ranks that split each sequence (cp mesh dimension)."""
    tensor_parallel_degree: int = 1
    """Megatron-style tensor + sequence parallel degree."""
    context_parallel_strategy: str = "ring"
    """Attention across cp ranks: ring (torch ring attention) | ulysses | usp | allgather."""
    context_parallel_rotate_method: str = "allgather"
    """KV exchange of the torch ring: allgather | alltoall."""
    context_parallel_load_balancer: str = "headtail"
    """Sequence layout over cp ranks: headtail (balanced causal work) | none (contiguous)."""
    context_parallel_ulysses_degree: int = 1
    """usp only: all-to-all (Ulysses) degree u; the ring degree is cp / u."""
    heads_k_stride: int = 1
    """allgather only: KV heads gathered per step (larger uses more memory, runs faster)."""
    disable_loss_parallel: bool = False
    """With tp > 1, gather the logits instead of computing the loss on vocabulary shards."""
    enable_async_tensor_parallel: bool = False
    """Overlap TP collectives with matmuls (GPU and compile only)."""
    fsdp_reshard_after_forward: str = "default"
    """Free blocks' unsharded parameters after forward: default (yes, unless FSDP spans one rank) | always | never."""

    @property
    def load_balance(self) -> bool:
        """Head-tail layout of the sequence over the cp ranks."""
        return self.context_parallel_load_balancer == "headtail"


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """none | full | selective."""
    selective_ac_option: str = "2"
    """selective mode: an integer N checkpoints every N-th block; "op" saves matmul and SDPA outputs, recomputes the rest."""  # noqa: E501
    tiled_mlp_shards: int = 1
    """Run each feed-forward over this many sequence tiles with recomputation (1 = off)."""
    offload: bool = False
    """Keep full-AC block inputs in pinned CPU memory (GPU only; a no-op on CPU)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each TransformerBlock, and the cross-entropy when tp = 1."""


@dataclass
class Metrics:
    log_freq: int = 1
    """Log every N steps (console, TensorBoard, metrics.jsonl)."""
    enable_tensorboard: bool = True
    """Write TensorBoard event files under <dump_folder>/tb."""
    disable_color_printing: bool = False
    """Plain console lines also on a terminal (colour is only used when run_train.sh's output is one)."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save DCP checkpoints and resume from the newest complete one."""
    folder: str = "checkpoint"
    """Checkpoint folder under the dump folder."""
    interval: int = 500
    """Save every N steps (and at the last step)."""
    async_mode: str = "disabled"
    """disabled | async (save in a background thread)."""
    keep_latest_k: int = 0
    """Keep only the newest k checkpoints (0 = keep all)."""
    load_step: int = -1
    """Resume from this step instead of the newest (-1 = newest)."""
    initial_load_path: str = ""
    """Start from model weights only (fresh optimizer, step 0): a DCP step-N folder, an exported model.pt, or a HF folder (initial_load_in_hf)."""  # noqa: E501
    export_final: bool = False
    """After the last step, write the model weights alone to <folder>/model.pt."""
    initial_load_in_hf: bool = False
    """initial_load_path is a Hugging Face folder of safetensors (model.safetensors or shards + index), read shard by shard."""  # noqa: E501
    last_save_in_hf: bool = False
    """After the last step, write a Hugging Face folder <folder>/step-N-hf (safetensors, config.json, tokenizer files)."""  # noqa: E501
    export_dtype: str = "float32"
    """Weights dtype of last_save_in_hf: float32 | bfloat16."""
    save_on_sigterm: bool = True
    """On SIGTERM or Ctrl-C (SIGINT), finish the step and save a checkpoint before exiting (143 / 130)."""


@dataclass
class Comm:
    init_timeout_seconds: int = 300
    """Timeout for process-group set-up and the first step."""
    train_timeout_seconds: int = 100
    """Collective timeout after the first step: a dead rank makes the others exit within it."""
    checkpoint_timeout_seconds: int = 600
    """Timeout of checkpoint saves' collectives (a group of their own): ranks may finish writing far apart."""


@dataclass
class Validation:
    enable: bool = False
    """Evaluate a held-out loss (forward only, on the training mesh) every `freq` steps and after the last."""
    dataset: str = "files"
    """Held-out data: files (validation.dataset_path) | stdlib | synthetic (a stream seeded apart from training's)."""
    dataset_path: str = ""
    """File, folder or glob of held-out documents (the formats of training.dataset_path)."""
    freq: int = 500
    """Evaluate every N training steps (and after the last step)."""
    steps: int = -1
    """Batches per evaluation; -1 = the whole set (one pass over its documents; not with synthetic)."""
    seq_len: int = 0
    """Tokens per validation sequence (0 = training.seq_len); packed like training."""
    local_batch_size: int = 1
    """Sequences per data-parallel rank per validation forward (also the passkey batch)."""
    eval_only: bool = False
    """Evaluate the starting weights (init, a resumed checkpoint or checkpoint.initial_load_path) and exit."""


@dataclass
class Passkey:
    lengths: str = ""
    """Passkey haystack lengths in tokens, comma-separated (empty = no passkey probe); runs with validation."""
    depths: str = "0,0.25,0.5,0.75,1"
    """Where the key sits in the haystack, comma-separated fractions in 0..1."""
    trials: int = 4
    """Haystacks per (length, depth) cell, each with its own random key."""
    digits: int = 5
    """Digits of the random key."""


@dataclass
class Debug:
    seed: int = 0
    """Seed for model init and data."""
    deterministic: bool = False
    """Use deterministic algorithms (slower)."""


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    metrics: Metrics = field(default_factory=Metrics)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    comm: Comm = field(default_factory=Comm)
    validation: Validation = field(default_factory=Validation)
    passkey: Passkey = field(default_factory=Passkey)
    debug: Debug = field(default_factory=Debug)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# Choices checked for string keys: key -> valid values.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": ("llama3",),
    "model.flavor": ("debug", "1B", "3B", "8B", "70B", "405B", "hf"),
    "optimizer.name": ("AdamW",),
    "optimizer.implementation": ("fused", "foreach", "for-loop"),
    "lr_scheduler.decay_type": ("linear", "cosine", "none"),
    "training.dataset": ("synthetic", "stdlib", "files", "chat"),
    "training.truncation": ("drop", "right"),
    "training.mixed_precision_param": ("bfloat16", "float32"),
    "training.mixed_precision_reduce": ("float32", "bfloat16"),
    "parallelism.context_parallel_strategy": ("ring", "ulysses", "usp", "allgather"),
    "parallelism.context_parallel_rotate_method": ("allgather", "alltoall"),
    "parallelism.context_parallel_load_balancer": ("headtail", "none"),
    "parallelism.fsdp_reshard_after_forward": ("default", "always", "never"),
    "activation_checkpoint.mode": ("none", "full", "selective"),
    "checkpoint.async_mode": ("disabled", "async"),
    "validation.dataset": ("files", "stdlib", "synthetic"),
    "checkpoint.export_dtype": ("float32", "bfloat16"),
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (read from the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory().__class__ for f in fields(Config)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a TOML or command-line value to the type of the field's default."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        value = ",".join(str(v) for v in value)  # a TOML list of numbers for a comma-separated key
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    value = str(value)
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of {' | '.join(CHOICES[key])}")
    return value


def _set(cfg: Config, dotted: str, value: Any) -> None:
    sections = _sections()
    if "." not in dotted:
        raise ConfigError(f"--{dotted}: options are --section.key; sections: {', '.join(sections)}")
    sec, key = dotted.split(".", 1)
    if sec not in sections:
        raise ConfigError(f"unknown config section {sec!r} (in {dotted}); valid: {', '.join(sections)}")
    obj = getattr(cfg, sec)
    names = [f.name for f in fields(obj)]
    if key not in names:
        raise ConfigError(f"unknown config key {dotted!r}; keys of [{sec}]: {', '.join(names)}")
    setattr(obj, key, _coerce(dotted, value, getattr(obj, key)))


def resolve_config_path(name: str) -> Path:
    """A path as given if it exists, else train_configs/<name>."""
    p = Path(name)
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"--config {name}: is a folder; give a .toml file")
    if not p.is_absolute() and (CONFIG_DIR / name).is_file():
        return CONFIG_DIR / name
    available = ", ".join(sorted(x.name for x in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"--config {name}: no such file (nor in train_configs/: {available})")


def _parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    config_file, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --section.key value")
        name, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            else:
                val = "true"  # a bare flag switches a boolean on
        if name in ("config", "job.config_file"):
            config_file = val
        else:
            pairs.append((name, val))
        i += 1
    return config_file, pairs


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults, then the TOML recipe, then command-line overrides; then validation of single keys."""
    argv = sys.argv[1:] if argv is None else argv
    config_file, pairs = _parse_cli(argv)
    cfg = Config()
    if config_file != "":  # --config "" means dataclass defaults only
        path = resolve_config_path(config_file or DEFAULT_RECIPE)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for sec, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {sec!r} must be a [section]; "
                                  f"sections: {', '.join(_sections())}")
            for key, val in table.items():
                _set(cfg, f"{sec}.{key}", val)
        cfg.job.config_file = str(path)
    recipe = copy.deepcopy(cfg)
    for name, val in pairs:
        _set(cfg, name, val)
    check_values(cfg)
    # Defaults + TOML before the command line, and the keys the command line set: meaningful.py tells
    # a recipe value that an override set aside from a value the user gave.
    cfg.recipe, cfg.overrides = recipe, {name for name, _ in pairs}
    return cfg


def check_values(cfg: Config) -> None:
    """Rules on single keys; rules that involve the world size live in parallel_dims."""
    t, p = cfg.training, cfg.parallelism
    positive = {"training.seq_len": t.seq_len, "training.local_batch_size": t.local_batch_size,
                "training.steps": t.steps, "metrics.log_freq": cfg.metrics.log_freq,
                "parallelism.data_parallel_replicate_degree": p.data_parallel_replicate_degree,
                "parallelism.context_parallel_degree": p.context_parallel_degree,
                "parallelism.tensor_parallel_degree": p.tensor_parallel_degree,
                "parallelism.context_parallel_ulysses_degree": p.context_parallel_ulysses_degree,
                "parallelism.heads_k_stride": p.heads_k_stride,
                "activation_checkpoint.tiled_mlp_shards": cfg.activation_checkpoint.tiled_mlp_shards,
                "checkpoint.interval": cfg.checkpoint.interval}
    o, ck, dp_shard = cfg.optimizer, cfg.checkpoint, p.data_parallel_shard_degree
    ranges = {  # key: (value, rule, holds)
        **{key: (val, ">= 1", val >= 1) for key, val in positive.items()},
        "parallelism.data_parallel_shard_degree": (dp_shard, "-1 or >= 1", dp_shard == -1 or dp_shard >= 1),
        "model.n_layers": (cfg.model.n_layers, ">= 0 (0 = the flavor's)", cfg.model.n_layers >= 0),
        "optimizer.lr": (o.lr, "> 0", o.lr > 0 and math.isfinite(o.lr)),
        "optimizer.beta1": (o.beta1, "in [0, 1)", 0 <= o.beta1 < 1),
        "optimizer.beta2": (o.beta2, "in [0, 1)", 0 <= o.beta2 < 1),
        "optimizer.eps": (o.eps, "> 0", o.eps > 0 and math.isfinite(o.eps)),
        "optimizer.weight_decay": (o.weight_decay, ">= 0", o.weight_decay >= 0 and math.isfinite(o.weight_decay)),
        "lr_scheduler.warmup_steps": (cfg.lr_scheduler.warmup_steps, ">= 0", cfg.lr_scheduler.warmup_steps >= 0),
        "lr_scheduler.min_lr_factor": (cfg.lr_scheduler.min_lr_factor, "in [0, 1]",
                                       0 <= cfg.lr_scheduler.min_lr_factor <= 1),
        "training.max_norm": (t.max_norm, "finite (<= 0 disables clipping)", math.isfinite(t.max_norm)),
        "checkpoint.keep_latest_k": (ck.keep_latest_k, ">= 0", ck.keep_latest_k >= 0),
        "checkpoint.load_step": (ck.load_step, "-1 (newest) or >= 0", ck.load_step >= -1),
        "comm.init_timeout_seconds": (cfg.comm.init_timeout_seconds, "> 0", cfg.comm.init_timeout_seconds > 0),
        "comm.train_timeout_seconds": (cfg.comm.train_timeout_seconds, "> 0", cfg.comm.train_timeout_seconds > 0),
        "comm.checkpoint_timeout_seconds": (cfg.comm.checkpoint_timeout_seconds, "> 0",
                                            cfg.comm.checkpoint_timeout_seconds > 0),
    }
    for key, (val, rule, holds) in ranges.items():
        if not holds:
            raise ConfigError(f"{key}: must be {rule}, got {val}")
    if ck.load_step >= 0 and not ck.enable:
        raise ConfigError(f"checkpoint.load_step: resuming from step {ck.load_step} needs checkpoint.enable = true "
                          "(checkpoint.initial_load_path starts from weights alone)")
    sac = cfg.activation_checkpoint.selective_ac_option
    if sac != "op" and not (sac.isdigit() and int(sac) >= 1):
        raise ConfigError(f"activation_checkpoint.selective_ac_option: 'op' or a positive integer, got {sac!r}")
    if cfg.activation_checkpoint.offload and cfg.activation_checkpoint.mode != "full":
        raise ConfigError("activation_checkpoint.offload: needs activation_checkpoint.mode = 'full' "
                          f"(mode is {cfg.activation_checkpoint.mode!r})")
    if t.dataset in ("files", "chat") and not t.dataset_path:
        raise ConfigError(f"training.dataset_path: required when training.dataset = {t.dataset!r}")


LAUNCHER_VARIABLES = {
    "NGPU": "processes to start (default: every visible GPU; with none, 4 CPU processes over gloo)",
    "LOG_RANK": "ranks whose output is shown (default 0; e.g. 0,1)",
    "SHUTDOWN_TIMEOUT": "seconds the workers get after SIGTERM or Ctrl-C to finish the step and save (default 300)",
    "NNODES": "nodes (default 1); with more, run the same command on every node with the same RDZV_ENDPOINT",
    "RDZV_ENDPOINT": "HOST:PORT of the c10d rendezvous (the first launcher to arrive serves it)",
    "RDZV_TIMEOUT": "seconds to wait for every node to arrive (default 600)",
    "PYTHON": "interpreter (default: the active environment's python3, else the project's .venv if made, else python3)",
}


def help_text(defaults: Config | None = None) -> str:
    """Every key with its type, its value in `defaults` (default: the default recipe's) and its docstring."""
    defaults = load_config([]) if defaults is None else defaults
    recipe = Path(defaults.job.config_file).name or "no recipe"
    lines = ["usage: run_train.sh [--config NAME.toml] [--section.key value | --section.key=value ...]",
             f"defaults: {recipe} (--config), over the built-in values", ""]
    for sec, cls in _sections().items():
        lines.append(f"[{sec}]")
        docs, default = field_docs(cls), getattr(defaults, sec)
        for f in fields(cls):
            value = getattr(default, f.name)
            if (sec, f.name) == ("job", "config_file"):
                value = Path(value).name
            lines.append(f"  --{sec}.{f.name} ({type(value).__name__}, default {value!r}): {docs.get(f.name, '')}")
    lines.append("environment variables (run_train.sh)")
    lines += [f"  {name}: {text}" for name, text in LAUNCHER_VARIABLES.items()]
    return "\n".join(lines)


def resolve_repo_path(path: str) -> Path:
    """Relative paths resolve against the working directory first, then the repo root."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p
