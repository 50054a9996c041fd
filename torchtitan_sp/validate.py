"""The launcher's check: `python -m torchtitan_sp.validate [args]` (what run_train.sh calls before
torchrun, with WORLD_SIZE set). Exit 0 = launch, 2 = bad input (one line on stderr), 3 = handled here
(--help or a dry run), nothing to launch. The rules themselves are rules.py's.
"""

from __future__ import annotations

import os
import sys

import torch

from torchtitan_sp.config import ConfigError, help_text, load_config
from torchtitan_sp.dry_run import dry_run
from torchtitan_sp.host_memory import check_host_memory
from torchtitan_sp.meaningful import check_meaningful, launch_device
from torchtitan_sp.models.shape import context_warning, model_args
from torchtitan_sp.rules import check_local_gpus, exit_bad_input, load_and_validate

EXIT_HANDLED = 3  # --help or a dry run: nothing to launch


def main() -> None:
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        try:  # the defaults shown are those of the recipe (and overrides) given with --help
            defaults = load_config([a for a in argv if a not in ("--help", "-h")])
        except ConfigError as e:
            exit_bad_input(e)
        print(help_text(defaults))
        sys.exit(EXIT_HANDLED)
    cfg, dims = load_and_validate(argv)
    if warning := context_warning(cfg, model_args(cfg.model)):
        print(f"warning: {warning}", file=sys.stderr)
    if cfg.job.dry_run:
        dry_run(cfg, dims)
        sys.exit(EXIT_HANDLED)
    try:
        check_meaningful(cfg, dims, launch_device())  # a launch: settings this device ignores too
        if "NPROC_PER_NODE" in os.environ:  # set by the launch scripts; WORLD_SIZE may span several nodes
            check_local_gpus(int(os.environ["NPROC_PER_NODE"]), torch.cuda.device_count())
        if launch_device() == "cpu":
            check_host_memory(cfg, dims, int(os.environ.get("NPROC_PER_NODE", dims.world_size)))
    except ConfigError as e:
        exit_bad_input(e)


if __name__ == "__main__":
    main()
