"""`python -m torchtitan_sp.estimate` (USAGE below): per-GPU memory of a run without running it.

Prints the breakdown of the peak (steady state: optimizer states exist), what to change when it does
not fit in --gpu_mem_gib, and the longest seq_len that fits for each CP strategy and memory option.
The arithmetic is memory_model's, the tables memory_report's; this module is the command line.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from torchtitan_sp.config import Config, ConfigError, load_config
from torchtitan_sp.memory_model import Setup, param_counts
from torchtitan_sp.memory_report import DEFAULT_GPU_MEM_GIB, GPU_MEM_GIB, report
from torchtitan_sp.rules import validate

DEFAULT_WORLD_SIZE = 8  # one node, when neither the recipe's degrees nor WORLD_SIZE give it
USAGE = f"""usage: python -m torchtitan_sp.estimate [--config NAME.toml] [--section.key value ...]
                                       [--world_size N] [--gpu_mem_gib G] [--host_mem_gib H] [--device cuda|cpu]
  --world_size N    ranks of the run (default: the recipe's degrees; with data_parallel_shard_degree = -1
                    WORLD_SIZE, else {DEFAULT_WORLD_SIZE})
  --gpu_mem_gib G   GiB per GPU for the fit check and the seq_len table (default: the fit check for an
                    80 GB H100 ({DEFAULT_GPU_MEM_GIB:g} GiB), tables for {' and '.join(GPU_MEM_GIB)})
  --host_mem_gib H  host RAM per node for what offloading keeps there (default: this machine's)
  --device D        cuda: compute in training.mixed_precision_param (default); cpu: fp32, as the trainer on CPU
config keys (--section.key value): ./run_train.sh --help"""


def default_world_size(cfg: Config) -> int:
    """The recipe's own world size when its degrees say it, else WORLD_SIZE, else one 8-GPU node."""
    p = cfg.parallelism
    if p.data_parallel_shard_degree > 0:
        return (p.data_parallel_replicate_degree * p.data_parallel_shard_degree * p.context_parallel_degree
                * p.tensor_parallel_degree)
    return int(os.environ.get("WORLD_SIZE", DEFAULT_WORLD_SIZE))


def parse_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The estimator's own options, and the rest of argv for load_config; ConfigError on a bad one."""
    opts: dict[str, Any] = {"world_size": None, "gpu_mem_gib": None, "host_mem_gib": None, "device": "cuda"}
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
                              "--host_mem_gib H, --device cuda|cpu (--help), config keys are --section.key value")
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
    kind = {"world_size": "integer (ranks of the run)", "gpu_mem_gib": "number (GiB per GPU)",
            "host_mem_gib": "number (GiB of host RAM per node)"}[key]
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
    layers = f" with {s.args.n_layers} layers (model.n_layers)" if cfg.model.n_layers else ""
    print(f"Llama 3 {cfg.model.flavor}{layers}"
          + f": {n:,} parameters; world size {world}{' (assumed)' if note else ''}: dp_replicate "
          f"{dims.dp_replicate} x dp_shard {dims.dp_shard} x cp {dims.cp} x tp {dims.tp}; seq_len {s.seq_len:,} "
          f"x local batch {s.batch} -> {s.tokens:,} tokens per rank")
    if note:
        print(note)
    print(report(s, accum, cfg.parallelism.fsdp_reshard_after_forward, world, opts["gpu_mem_gib"],
                 opts["host_mem_gib"]))



if __name__ == "__main__":
    main()
