"""Throughput arithmetic and the three metric sinks: console, TensorBoard, metrics.jsonl."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torchtitan_sp.models.llama3 import ModelArgs
from torchtitan_sp.progress import duration

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


# run_train.sh sets it to 1 when its own stdout is a terminal: under torchrun the workers' stdout is a pipe.
COLOR_ENV = "TORCHTITAN_SP_COLOR"


def use_color(disable_color_printing: bool, stream=None) -> bool:
    """Colour only on a terminal (the launcher's, else this process's stdout); the key forces plain lines."""
    if disable_color_printing:
        return False
    if COLOR_ENV in os.environ:
        return os.environ[COLOR_ENV] == "1"
    return bool(getattr(stream or sys.stdout, "isatty", lambda: False)())


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y%m%d-%H%M%S")


def _unused(path: Path) -> Path:
    """`path`, or the first of path-2, path-3, ... (before the suffix) that does not exist."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, dump_folder: Path, enable_tensorboard: bool, color: bool, active: bool, first_step: int,
                 total_steps: int):
        """`first_step` > 1 on resume: metrics.jsonl is appended to (the checkpointer has cut it
        back to the resumed step), and TensorBoard hides earlier runs' events from this step on."""
        self.folder, self.tensorboard, self.first_step = dump_folder, enable_tensorboard, first_step
        self.active, self.total_steps = active, total_steps
        self.color = color
        self.writer = None
        self.jsonl = None

    def _open(self) -> None:
        """At the first logged step: a run that fails before it leaves an earlier run's records as they were.

        A fresh run keeps the history of earlier ones in the folder: their metrics.jsonl is renamed to a
        dated name, and its TensorBoard events go to a subfolder of tb/ named for its start (as TorchTitan
        does). A resumed run appends to metrics.jsonl and to the newest TensorBoard subfolder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "metrics.jsonl"
        if self.first_step == 1 and path.exists():
            kept = _unused(self.folder / f"metrics-{_stamp(path.stat().st_mtime)}.jsonl")
            path.rename(kept)
            logger.info(f"a fresh run: the previous run's metrics.jsonl in {self.folder} is kept as {kept.name}")
        self.jsonl = open(path, "a" if self.first_step > 1 else "w")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = self.folder / "tb"
            runs = sorted(p for p in tb.glob("*") if p.is_dir()) if tb.is_dir() else []
            if self.first_step > 1:  # resumed: the newest run's folder (tb/ itself in the older layout)
                log_dir = runs[-1] if runs else tb
            else:
                log_dir = _unused(tb / _stamp(time.time()))
                logger.info(f"TensorBoard: {log_dir} (earlier runs' folders beside it)")
            # purge_step: a run that logged past its last checkpoint would otherwise show those steps twice.
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=self.first_step)

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

    def log_record(self, step: int, record: dict[str, Any], scalars: dict[str, float], line: str,
                   images: dict[str, bytes] | None = None) -> None:
        """A row of other metrics (validation): `record` to metrics.jsonl, `scalars` and PNG `images`
        (encoded bytes) to TensorBoard under their tags, `line` to the console."""
        if not self.active:
            return
        if self.jsonl is None:
            self._open()
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for tag, v in scalars.items():
                self.writer.add_scalar(tag, v, step)
            for tag, png in (images or {}).items():
                self.writer._get_file_writer().add_summary(_png_summary(tag, png), step)
            self.writer.flush()
        logger.info(line)

    def _line(self, step: int, m: dict[str, Any]) -> str:
        c = (lambda code, s: f"\033[{code}m{s}\033[0m") if self.color else (lambda code, s: s)
        parts = [c("31", f"step {step:>5}/{self.total_steps}"), c("36", f"loss {m['loss']:8.4f}"),
                 c("33", f"grad_norm {m['grad_norm']:7.3f}"), f"lr {m['lr']:.2e}",
                 c("32", f"tps {m['tps']:,.0f}")]
        if m.get("tflops") is not None:
            parts.append(c("34", f"tflops {m['tflops']:.1f}"))
        if m.get("mfu") is not None:
            parts.append(c("34", f"mfu {m['mfu']:.1f}%"))
        if m.get("mem_gib") is not None:
            parts.append(c("35", f"mem {m['mem_gib']:.2f}GiB"))
        parts.append(f"data {m['data_pct']:.1f}%")
        if m.get("s_per_step") is not None:
            eta = m["s_per_step"] * (self.total_steps - step)
            parts.append(c("90", f"{m['s_per_step']:.2f} s/step  ETA {duration(eta)}"))
        return "  ".join(parts)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def _png_summary(tag: str, png: bytes) -> Any:
    """A TensorBoard image summary of an encoded PNG (add_image wants decoded pixels)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # IHDR
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])
