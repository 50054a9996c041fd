"""Which checkpoints a dump folder holds, and what they hold: read before launch (rules.py) and by
CheckpointManager. No process group, no trainer: folder names and DCP's metadata file only.

Layout under <job.dump_folder>/<checkpoint.folder>: step-N/ (complete: DCP's .metadata present),
step-N.tmp/ (a save in progress, or complete but not yet renamed), model.pt (export_final).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_sp.config import Config, resolve_repo_path
from torchtitan_sp.hf_checkpoint import check_initial_weights
from torchtitan_sp.models.llama3 import Transformer
from torchtitan_sp.models.shape import model_args

STEP_DIR = re.compile(r"^step-(\d+)(?:\.tmp)?$")


def complete_checkpoints(folder: Path) -> dict[int, Path]:
    """step -> folder of every complete checkpoint (DCP's .metadata present): step-N, or a
    step-N.tmp whose rename the run did not reach (load publishes it)."""
    if not folder.is_dir():
        return {}
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.suffix != ".tmp"):  # step-N wins over step-N.tmp
        m = STEP_DIR.match(p.name)
        if m and (p / ".metadata").is_file():
            found[int(m.group(1))] = p
    return found


def resume_path(folder: Path, load_step: int) -> Path | None:
    """The checkpoint a run with checkpoint.enable resumes from: load_step's, else the newest, else none."""
    found = complete_checkpoints(folder)
    if load_step >= 0:
        if load_step not in found:
            raise FileNotFoundError(f"checkpoint.load_step {load_step}: no complete checkpoint step-{load_step} "
                                    f"in {folder} (complete ones: {sorted(found) or 'none'})")
        return found[load_step]
    return found[max(found)] if found else None


def check_checkpoint(cfg: Config) -> None:
    """Before launch (validate.py): the DCP checkpoint the run would load exists and holds exactly
    this model's parameters and shapes (DCP alone would load a cut model's subset without a word)."""
    ck = cfg.checkpoint
    key = "checkpoint.load_step"
    path = resume_path(Path(cfg.job.dump_folder) / ck.folder, ck.load_step) if ck.enable else None
    if path is None and ck.initial_load_path:
        key, path = "checkpoint.initial_load_path", resolve_repo_path(ck.initial_load_path)
        if check_initial_weights(cfg, path):  # a Hugging Face folder or an exported model.pt
            return
    if path is None:
        return
    if not (path / ".metadata").is_file():
        raise ValueError(f"{key}: {path} is not a DCP checkpoint folder (no .metadata)")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    have = {k: tuple(m.size) for k, m in saved.items() if k.startswith("model.") and hasattr(m, "size")}
    with torch.device("meta"):
        model = Transformer(model_args(cfg.model))
    want = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    differ = [k for k in want if want[k] != have.get(k)] + [k for k in have if k not in want]
    if differ:
        k = differ[0]
        raise ValueError(f"{key}: {path} holds another model than model.flavor {cfg.model.flavor!r} "
                         f"(model.n_layers {cfg.model.n_layers}): {k[len('model.'):]} is "
                         f"{list(have[k]) if k in have else 'absent'} there, "
                         f"{list(want[k]) if k in want else 'absent'} here")
