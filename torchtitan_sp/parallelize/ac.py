"""Activation checkpointing: full (every block), every N-th block, or op-level selective."""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan_sp.config import ActivationCheckpoint
from torchtitan_sp.models.llama3 import Transformer

logger = logging.getLogger(__name__)

aten = torch.ops.aten
# Op-level selective AC keeps the outputs of these (expensive to recompute) and recomputes the rest.
_SAVE_OPS = {
    aten.mm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _op_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: Transformer, ac: ActivationCheckpoint) -> None:
    if ac.mode == "none":
        return
    wrapped = 0
    for name, block in list(model.layers.items()):
        if ac.mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif ac.selective_ac_option == "op":
            context_fn = partial(create_selective_checkpoint_contexts, _op_policy)
            model.layers[name] = checkpoint_wrapper(block, context_fn=context_fn, preserve_rng_state=False)
        elif int(name) % int(ac.selective_ac_option) == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            continue
        wrapped += 1
    what = "full" if ac.mode == "full" else f"selective ({ac.selective_ac_option})"
    logger.info(f"activation checkpointing {what} on {wrapped} of {len(model.layers)} blocks")
