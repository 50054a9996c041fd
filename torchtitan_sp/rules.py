"""The rules that check a whole run configuration before any process group exists.

Single-key values are checked when the config is loaded (config.py); here, every rule across keys
and against the world size. Each component keeps its own check next to the code it mirrors
(parallel_dims, attention.check_cp_attention, data.sources.check_data_config,
checkpoint_files.check_checkpoint, evaluate.check_evaluation); `validate` calls them in order. Used by the launcher's
check (validate.py), the trainer, the dry run and the estimator.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from torchtitan_sp.attention import check_cp_attention
from torchtitan_sp.checkpoint_files import check_checkpoint
from torchtitan_sp.config import Config, ConfigError, load_config, resolve_repo_path
from torchtitan_sp.data.sources import check_data_config
from torchtitan_sp.evaluate import check_evaluation
from torchtitan_sp.hf_checkpoint import check_hf_keys
from torchtitan_sp.meaningful import check_meaningful
from torchtitan_sp.models.shape import check_hf_assets_path, model_args
from torchtitan_sp.parallel_dims import ParallelDims

EXIT_BAD_INPUT = 2
NGPU_DEFAULTED = "TORCHTITAN_SP_NGPU_DEFAULTED"  # run_train.sh sets it when it chose NGPU itself


def validate(cfg: Config, world_size: int) -> ParallelDims:
    """Every cross-key rule; raises ConfigError (or ValueError from a component) with one line."""
    dims = ParallelDims.from_config(cfg, world_size)
    dims.validate(cfg)
    check_meaningful(cfg, dims)
    p = cfg.parallelism
    if Path(cfg.job.dump_folder).is_file():
        raise ConfigError(f"job.dump_folder: {cfg.job.dump_folder} is a file, not a folder")
    tokens = cfg.training.seq_len // dims.cp
    if cfg.activation_checkpoint.tiled_mlp_shards > tokens:
        raise ConfigError(f"activation_checkpoint.tiled_mlp_shards: at most the {tokens} tokens per cp rank, "
                          f"got {cfg.activation_checkpoint.tiled_mlp_shards}")
    if dims.cp > 1:
        args = model_args(cfg.model)
        check_cp_attention(p.context_parallel_strategy, dims.cp, p.context_parallel_ulysses_degree,
                           p.heads_k_stride, args.n_heads // dims.tp, args.n_kv_heads // dims.tp,
                           rotate_method=p.context_parallel_rotate_method)
        uses_blocks = p.context_parallel_strategy != "ulysses"  # ring/usp/allgather call the block kernels
        if uses_blocks and cfg.training.mixed_precision_param == "float32" and torch.cuda.is_available():
            raise ConfigError(f"training.mixed_precision_param: float32 on GPUs does not combine with "
                              f"context_parallel_strategy {p.context_parallel_strategy!r} (its cuDNN/flash block "
                              "kernels take bfloat16 only); use bfloat16, or the ulysses strategy")
    check_data_config(cfg, dims.dp)
    check_hf_keys(cfg)
    check_hf_assets_path(cfg)
    if cfg.checkpoint.initial_load_path and not resolve_repo_path(cfg.checkpoint.initial_load_path).exists():
        raise ConfigError(f"checkpoint.initial_load_path: {cfg.checkpoint.initial_load_path} does not exist")
    if cfg.checkpoint.enable or cfg.checkpoint.initial_load_path:
        check_checkpoint(cfg)
    check_evaluation(cfg, dims)
    return dims


def load_and_validate(argv: list[str] | None = None, world_size: int | None = None) -> tuple[Config, ParallelDims]:
    """Parse and validate; on bad input print one line and exit 2 (rank 0 prints)."""
    argv = sys.argv[1:] if argv is None else argv
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    try:
        cfg = load_config(argv)
        return cfg, validate(cfg, world_size)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if "world size" in str(e) and os.environ.get(NGPU_DEFAULTED):
            e = ConfigError(f"{e}; NGPU was not set, so run_train.sh took {world_size} (every visible GPU, else 4 "
                            "CPU processes): set NGPU to the world size the degrees need")
        exit_bad_input(e)


def exit_bad_input(e: Exception) -> NoReturn:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def check_local_gpus(per_node: int, visible: int) -> None:
    """The launcher starts `per_node` processes on this node, one per GPU when there are GPUs
    (with none, CPU processes over gloo, any number)."""
    if 0 < visible < per_node:
        raise ConfigError(f"{per_node} processes per node (run_train.sh: NGPU, slurm_train.sh: GPUS_PER_NODE), "
                          f"but only {visible} GPU(s) are visible on this node; set it <= {visible}, or see the "
                          "README's \"Several nodes\"")
