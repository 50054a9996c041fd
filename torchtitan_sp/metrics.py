"""Throughput arithmetic and the three metric sinks: console, TensorBoard, metrics.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from torchtitan_sp.models.llama3 import ModelArgs

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s by device-name substring (first match wins).
PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 125.0),
]


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def flops_per_token(args: ModelArgs, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters) + attention 12 L H d_h S.

    TorchTitan's convention: the attention term counts the full S x S score matrix (no causal
    discount), so numbers compare with its logs.
    """
    n_embedding = 0 if args.tie_word_embeddings else args.vocab_size * args.dim  # tied: it is the output too
    return 6 * (n_params - n_embedding) + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, dump_folder: Path, enable_tensorboard: bool, color: bool, active: bool, first_step: int):
        """`first_step` > 1 on resume: metrics.jsonl is appended to (the checkpointer has cut it
        back to the resumed step), and TensorBoard hides earlier runs' events from this step on."""
        self.folder, self.tensorboard, self.first_step = dump_folder, enable_tensorboard, first_step
        self.active = active
        self.color = color
        self.writer = None
        self.jsonl = None

    def _open(self) -> None:
        """At the first logged step: a run that fails before it leaves an earlier run's records as they were."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.folder / "metrics.jsonl", "a" if self.first_step > 1 else "w")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: a run that logged past its last checkpoint would otherwise show those steps twice.
            self.writer = SummaryWriter(log_dir=str(self.folder / "tb"), purge_step=self.first_step)

    def log(self, step: int, m: dict[str, Any]) -> None:
        if not self.active:
            return
        if self.jsonl is None:
            self._open()
        record = {"step": step, **{k: v for k, v in m.items() if v is not None}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        logger.info(self._line(step, m))

    def _line(self, step: int, m: dict[str, Any]) -> str:
        c = (lambda code, s: f"\033[{code}m{s}\033[0m") if self.color else (lambda code, s: s)
        parts = [c("31", f"step {step:>5}"), c("36", f"loss {m['loss']:8.4f}"),
                 c("33", f"grad_norm {m['grad_norm']:7.3f}"), f"lr {m['lr']:.2e}",
                 c("32", f"tps {m['tps']:,.0f}")]
        if m.get("tflops") is not None:
            parts.append(c("34", f"tflops {m['tflops']:.1f}"))
        if m.get("mfu") is not None:
            parts.append(c("34", f"mfu {m['mfu']:.1f}%"))
        if m.get("mem_gib") is not None:
            parts.append(c("35", f"mem {m['mem_gib']:.2f}GiB"))
        parts.append(f"data {m['data_pct']:.1f}%")
        return "  ".join(parts)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
