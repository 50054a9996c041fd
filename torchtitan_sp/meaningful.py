"""No silently ignored settings: a value that the rest of the configuration makes meaningless is an error.

One table, RULES: for each key that some configurations ignore, when it is ignored and what would make
it matter. A key set away from its default while the rest of the configuration ignores it stops the run
before launch with one line naming both keys (exit 2). Every rule is an error rather than switching the
needed setting on: turning on checkpoints, context parallelism or a dataset behind the user's back would
be a surprise of its own. Keys absent from the table matter in every configuration;
tests/test_meaningful.py walks every key and shows that its non-default values change what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from torchtitan_sp.attention import GATHERED_FOR_DOCUMENTS
from torchtitan_sp.config import Config, ConfigError
from torchtitan_sp.parallel_dims import ParallelDims


@dataclass(frozen=True)
class Needs:
    key: str  # section.key that would be ignored
    needs: str  # what makes it matter, naming the other key(s)
    # True when the rest of the config ignores `key`; the device is "cuda" or "cpu" for a launch, None when
    # planning (dry run, estimator: a GPU run on any machine).
    ignored: Callable[[Config, ParallelDims, str | None], bool]


def _ring_exchanges(c: Config, d: ParallelDims) -> bool:
    """torch's ring rotates K/V: ring, or usp with a ring of more than one rank, without document
    masks (with them both run as allgather's document pieces)."""
    p = c.parallelism
    ring = p.context_parallel_strategy == "ring" or (
        p.context_parallel_strategy == "usp" and d.cp > p.context_parallel_ulysses_degree)
    gathered = c.training.document_masks and p.context_parallel_strategy in GATHERED_FOR_DOCUMENTS
    return d.cp > 1 and ring and not gathered


def _tokenizes(c: Config) -> bool:
    """Text is tokenized: the training data, the validation set or the passkey haystacks."""
    v = c.validation
    return c.training.dataset != "synthetic" or (v.enable and (v.dataset != "synthetic" or bool(c.passkey.lengths)))


_NO_CKPT = "checkpoint.enable = true"
_VAL = "validation.enable = true"
RULES: tuple[Needs, ...] = (
    Needs("checkpoint.interval", _NO_CKPT, lambda c, d, dev: not c.checkpoint.enable),
    Needs("checkpoint.async_mode", _NO_CKPT, lambda c, d, dev: not c.checkpoint.enable),
    Needs("checkpoint.keep_latest_k", _NO_CKPT, lambda c, d, dev: not c.checkpoint.enable),
    Needs("checkpoint.save_on_sigterm", _NO_CKPT, lambda c, d, dev: not c.checkpoint.enable),
    Needs("comm.checkpoint_timeout_seconds", _NO_CKPT, lambda c, d, dev: not c.checkpoint.enable),
    Needs("checkpoint.folder", "checkpoint.enable = true or checkpoint.export_final = true",
          lambda c, d, dev: not (c.checkpoint.enable or c.checkpoint.export_final)),
    Needs("activation_checkpoint.selective_ac_option", "activation_checkpoint.mode = 'selective'",
          lambda c, d, dev: c.activation_checkpoint.mode != "selective"),
    Needs("activation_checkpoint.offload", "CUDA GPUs (a no-op on CPU; a job.dry_run plans a GPU run)",
          lambda c, d, dev: dev == "cpu"),
    Needs("parallelism.context_parallel_strategy", "parallelism.context_parallel_degree > 1",
          lambda c, d, dev: d.cp == 1),
    Needs("parallelism.context_parallel_load_balancer", "parallelism.context_parallel_degree > 1",
          lambda c, d, dev: d.cp == 1),
    Needs("parallelism.context_parallel_ulysses_degree",
          "parallelism.context_parallel_strategy = 'usp' and context_parallel_degree > 1",
          lambda c, d, dev: d.cp == 1 or c.parallelism.context_parallel_strategy != "usp"),
    Needs("parallelism.heads_k_stride",
          "parallelism.context_parallel_strategy = 'allgather' and context_parallel_degree > 1",
          lambda c, d, dev: d.cp == 1 or c.parallelism.context_parallel_strategy != "allgather"),
    Needs("parallelism.context_parallel_rotate_method",
          "torch's ring: parallelism.context_parallel_degree > 1 with context_parallel_strategy 'ring' (or 'usp' "
          "with a ring of more ranks than context_parallel_ulysses_degree), and no document masks "
          "(training.packing with a text training.dataset runs the ring as allgather)",
          lambda c, d, dev: not _ring_exchanges(c, d)),
    Needs("parallelism.disable_loss_parallel", "parallelism.tensor_parallel_degree > 1", lambda c, d, dev: d.tp == 1),
    Needs("training.dataset_path", "training.dataset = 'files' or 'chat'",
          lambda c, d, dev: c.training.dataset not in ("files", "chat")),
    Needs("training.packing", "a text training.dataset (stdlib, files or chat; a synthetic sample is one document)",
          lambda c, d, dev: c.training.dataset == "synthetic"),
    Needs("model.tokenizer_path", "a text training.dataset or validation set, or the passkey probe (synthetic data "
          "is not tokenized)", lambda c, d, dev: not _tokenizes(c)),
    Needs("validation.eval_only", _VAL, lambda c, d, dev: not c.validation.enable),
    *(Needs(f"validation.{key}", _VAL, lambda c, d, dev: not c.validation.enable)
      for key in ("dataset", "freq", "steps", "seq_len", "local_batch_size")),
    Needs("validation.dataset_path", "validation.enable = true and validation.dataset = 'files'",
          lambda c, d, dev: not c.validation.enable or c.validation.dataset != "files"),
    Needs("passkey.lengths", _VAL + " (the passkey probe runs with validation)",
          lambda c, d, dev: not c.validation.enable),
    *(Needs(f"passkey.{key}", "passkey.lengths (the passkey probe's haystack lengths)",
            lambda c, d, dev: not c.passkey.lengths) for key in ("depths", "trials", "digits")),
    Needs("lr_scheduler.min_lr_factor", "lr_scheduler.decay_type linear or cosine",
          lambda c, d, dev: c.lr_scheduler.decay_type == "none"),
)


def value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _show(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else repr(v)  # as TOML writes booleans


def launch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_meaningful(cfg: Config, dims: ParallelDims, device: str | None = None) -> None:
    """Raise ConfigError (one line naming both keys) for a non-default value the rest of `cfg` ignores
    (on `device`, for a launch; None: planning, on any device). A recipe's value that only a
    command-line override makes meaningless (`--activation_checkpoint.mode full` on a recipe with a
    selective option) is set aside, not an error: the override says what the user wants."""
    default, recipe, given = Config(), getattr(cfg, "recipe", None), getattr(cfg, "overrides", set())
    for rule in RULES:
        val = value(cfg, rule.key)
        if val == value(default, rule.key) or not rule.ignored(cfg, dims, device):
            continue
        if recipe is not None and rule.key not in given and not rule.ignored(recipe, dims, device):
            continue  # the recipe's own value, which a command-line override set aside (say, another AC mode)
        raise ConfigError(f"{rule.key} = {_show(val)} has no effect without {rule.needs}; "
                          f"set that, or leave {rule.key} at its default {_show(value(default, rule.key))}")
