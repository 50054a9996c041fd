"""torch.compile each TransformerBlock (repeated structure: one compiled graph, reused)."""

from __future__ import annotations

import logging

import torch

from torchtitan_sp.models.llama3 import Transformer

logger = logging.getLogger(__name__)


def apply_compile(model: Transformer) -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block)
    logger.info(f"torch.compile on each of {len(model.layers)} TransformerBlocks")
