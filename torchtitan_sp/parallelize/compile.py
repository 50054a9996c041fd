"""torch.compile each TransformerBlock (repeated structure: one compiled graph, reused).

Two torch 2.13 bugs need work-arounds when the blocks hold TP DTensor weights (tested in tests/test_tp.py):
- Compiled code bakes in this rank's TP process-group name, but the FX-graph and AOTAutograd
  cache keys leave it out, so a rank of another tp group (or a later run on another mesh) loads it
  and fails with "Could not resolve the process group registered under the name ...".
  With TP those on-disk caches are off: every run compiles afresh.
- Compiling a fully checkpointed block fails in AOTAutograd ("expected all
  tensors_saved_with_vc_check to be Tensors, got ... DeviceMesh"). Such blocks are compiled
  inside their checkpoint instead; eager AC then recomputes the compiled forward.
"""

from __future__ import annotations

import logging

import torch
import torch._functorch.config
import torch._inductor.config
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor

from torchtitan_sp.models.llama3 import Transformer

logger = logging.getLogger(__name__)


def _full_ac(block: nn.Module) -> bool:
    """Checkpointed without a selective policy (parallelize.ac passes context_fn only for op-level SAC)."""
    return isinstance(block, CheckpointWrapper) and "context_fn" not in block.checkpoint_fn.keywords


def apply_compile(model: Transformer) -> None:
    tp = any(isinstance(p, DTensor) for p in model.layers.parameters())
    if tp:
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    inside_ac = 0
    for name, block in list(model.layers.items()):
        if tp and _full_ac(block):
            block._checkpoint_wrapped_module = torch.compile(block._checkpoint_wrapped_module)
            inside_ac += 1
        else:
            model.layers[name] = torch.compile(block)
    logger.info(f"torch.compile on each of {len(model.layers)} TransformerBlocks"
                + (f" ({inside_ac} inside their activation checkpoint)" if inside_ac else "")
                + (" (TP: no on-disk compile cache)" if tp else ""))
