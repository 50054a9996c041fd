"""A CPU launch checks the memory estimate against the host's available memory before any process
allocates (the GPU path warns against device memory at start-up; on CPU, processes that do not fit
take the whole machine down into swap or the out-of-memory killer)."""

from __future__ import annotations

from pathlib import Path

from torchtitan_sp.config import Config, ConfigError
from torchtitan_sp.memory_model import GIB, Setup, estimate, max_seq_len
from torchtitan_sp.parallel_dims import ParallelDims


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_host_memory(cfg: Config, dims: ParallelDims, processes: int) -> None:
    """Raise ConfigError (one line: the numbers and what fits) when `processes` CPU processes of this
    run would need more than the host's available memory."""
    available = available_bytes()
    if available is None:
        return
    s, accum = Setup.from_config(cfg, dims, "cpu"), dims.grad_accum_steps(cfg)
    per_process = estimate(s, accum)["peak"]
    if per_process * processes <= available:
        return
    fit = max_seq_len(s, available / processes / GIB, accum)
    fits = (f"training.seq_len {fit} fits" if fit else "no seq_len fits this model.flavor; use fewer processes "
            "(NGPU) or a smaller model.flavor / model.n_layers")
    raise ConfigError(f"host memory: this run needs about {per_process / GIB:.1f} GiB per process x {processes} "
                      f"processes = {per_process * processes / GIB:.1f} GiB, but {available / GIB:.1f} GiB are "
                      f"available; {fits} (`python -m torchtitan_sp.estimate --device cpu` with these arguments "
                      "breaks it down)")
