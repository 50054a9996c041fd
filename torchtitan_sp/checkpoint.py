"""DCP checkpoints: periodic saves, automatic resume (also onto another mesh), weight export, SIGTERM.

Layout under <job.dump_folder>/<checkpoint.folder>:
  step-N/      a complete checkpoint: model, optimizer, data loaders, step, tokens_seen, RNG
  step-N.tmp/  a save in progress. DCP writes here; rank 0 renames it to step-N once DCP has written
               its .metadata, which it does only after every rank's files are written. So a crash
               mid-save never leaves a partial step-N. At resume rank 0 removes a step-N.tmp without
               .metadata and publishes one with it (complete, but not renamed before the stop).
  model.pt     checkpoint.export_final: the full model state dict alone (torch.save), for use elsewhere.
  step-N-hf/   checkpoint.last_save_in_hf: the final model as a Hugging Face folder (hf_checkpoint.py).
The lr schedule is not saved: it is a function of the step and of the resumed run's keys, which
win over the saved optimizer's lr, betas, eps and weight decay (so a resume may change them).

Resharding: model and optimizer are saved as DTensor shards, which DCP loads onto any mesh.
Data-loader states are saved per data-parallel rank ("dataloader.dp_rank_R"). With the same dp
degree each rank gets its own back and the data order resumes exactly. With another dp degree
the per-rank states do not map 1:1; a dataset whose state is a global sample cursor strided over
the dp ranks ({"next_index": i}, rank r of d reading r, r + d, ...: the synthetic dataset)
continues at the same global sample, so with an unchanged global batch every step sees the
samples it would have seen. The text datasets continue after the furthest document any old rank
reached (data.text.resume_after): nothing is repeated, a few unread documents are skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_sp.checkpoint_files import complete_checkpoints, resume_path
from torchtitan_sp.config import Config, resolve_repo_path
from torchtitan_sp.data.sources import MIXTURE_STATE, mixture_resume_after
from torchtitan_sp.data.text import Cursor, resume_after
from torchtitan_sp.hf_checkpoint import export_hf, load_hf_weights
from torchtitan_sp.interrupt import CTRL_C, EXIT_INTERRUPTED
from torchtitan_sp.interrupt import install as install_ctrl_c
from torchtitan_sp.models.shape import model_args

logger = logging.getLogger("torchtitan_sp")

EXIT_SIGTERM = 128 + signal.SIGTERM  # the shell's code for "terminated": the run did not finish


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl record; inf for a line that is not one."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    """The training loop's own state, saved with the model, optimizer and data loaders."""
    step: int = 0
    tokens_seen: int = 0


class CheckpointManager:
    """Saves, loads and exports what it is given: the model, optimizer, data loader and train state
    (the loader's state per data-parallel rank of `dp_mesh`). Every method is called on all ranks."""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer,
                 dataloader: StatefulDataLoader, train_state: TrainState, dp_mesh: DeviceMesh):
        self.cfg, self.ck = cfg, cfg.checkpoint
        self.model, self.optimizer, self.dataloader, self.train_state = model, optimizer, dataloader, train_state
        self.folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
        self.metrics_file = Path(cfg.job.dump_folder) / "metrics.jsonl"
        self.rank = dist.get_rank()
        self.dp_rank, self.dp = dp_mesh.get_local_rank(), dp_mesh.size()
        self.device = torch.device(dp_mesh.device_type)  # of the SIGTERM flag's all-reduce
        self.pending: tuple[Future, int] | None = None  # the async save in flight and its step
        self.pg: dist.ProcessGroup | None = None
        if self.ck.enable:
            # Saves' collectives wait for every rank's writes, which can finish minutes apart on a
            # shared file system: a group of their own with comm.checkpoint_timeout_seconds (the
            # training timeout does not apply to it). An async save also runs its collectives while
            # training runs its own; its own group keeps them apart (and DCP's async save needs gloo).
            self.pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.comm.checkpoint_timeout_seconds))
        # signal.signal works only in the main thread; the condition is the same on every rank,
        # which matters because maybe_save then all-reduces the flag on every rank.
        self.watch_sigterm = (self.ck.enable and self.ck.save_on_sigterm
                              and threading.current_thread() is threading.main_thread())
        self.sigterm = False
        self.prev_handler: Any = None
        if self.watch_sigterm:
            self.prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            CTRL_C.defer = True  # the first Ctrl-C stops after the step, with a checkpoint, too
            install_ctrl_c()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True  # acted on at the end of the current step, on all ranks together

    # ---- state ----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """The DCP state dict. Non-tensor values are pickled bytes: DCP stores each as one item,
        and keys that differ per rank (data loader, RNG) are kept apart by name."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd,
                "train_state": pickle.dumps(asdict(self.train_state)),
                "dataloader": {f"dp_rank_{self.dp_rank}": pickle.dumps(self.dataloader.state_dict())},
                "rng": {f"rank_{self.rank}": pickle.dumps(_rng_state())}}

    # ---- load -----------------------------------------------------------------------------

    def load(self) -> None:
        """Resume from checkpoint.load_step or the newest complete checkpoint; else, if given,
        start from checkpoint.initial_load_path's weights."""
        if self.ck.enable:
            if self.rank == 0:
                self._finish_interrupted_saves()
            dist.barrier()  # every rank then sees the same checkpoints
            path = resume_path(self.folder, self.ck.load_step)
            if path is not None:
                self._load_checkpoint(path)
                return
        if self.ck.initial_load_path and self.ck.initial_load_in_hf:
            load_hf_weights(self.model, resolve_repo_path(self.ck.initial_load_path), model_args(self.cfg.model))
        elif self.ck.initial_load_path:
            self._load_weights(resolve_repo_path(self.ck.initial_load_path))

    def _load_checkpoint(self, path: Path) -> None:
        start = time.perf_counter()
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        old_dp = sum(k.startswith("dataloader.") for k in saved)
        same_world = sum(k.startswith("rng.") for k in saved) == dist.get_world_size()
        # Another dp degree needs every old rank's data state to place the new ranks.
        loader_keys = [f"dp_rank_{r}" for r in ([self.dp_rank] if old_dp == self.dp else range(old_dp))]
        state = self._state()
        state["dataloader"] = {key: b"" for key in loader_keys}
        if not same_world:  # per-rank RNG streams do not map onto another world size
            del state["rng"]
        dcp.load(state, checkpoint_id=str(path))

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        t = self.train_state
        t.step, t.tokens_seen = (pickle.loads(state["train_state"])[k] for k in ("step", "tokens_seen"))
        self._load_dataloader([pickle.loads(state["dataloader"][key]) for key in loader_keys], old_dp == self.dp)
        if same_world:
            _set_rng_state(pickle.loads(state["rng"][f"rank_{self.rank}"]))
        else:
            logger.info("world size changed: RNG states not restored (seeded afresh)")
        if self.rank == 0:
            self._trim_metrics(t.step)
        logger.info(f"resumed from {path} at step {t.step} ({t.tokens_seen:,} tokens seen) "
                    f"in {time.perf_counter() - start:.2f}s")

    def _load_dataloader(self, states: list[dict[str, Any]], same_dp: bool) -> None:
        """`states`: this rank's own (same dp degree) or every old dp rank's, in rank order."""
        loader, dp = self.dataloader, self.dp
        if same_dp:
            loader.load_state_dict(states[0])
            return
        old_dp, state = len(states), states[0]
        ds = state.get("dataset_state")
        if isinstance(ds, dict) and set(ds) == {"next_index"}:
            # dp rank 0's cursor counts the samples the whole old dp group consumed.
            consumed = ds["next_index"]
            ds["next_index"] = consumed + self.dp_rank
            loader.load_state_dict(state)
            logger.info(f"data-parallel degree changed {old_dp} -> {dp}: the sample stream continues at "
                        f"global sample {consumed}, strided over the new dp ranks")
        elif isinstance(ds, dict) and set(ds) == {*Cursor._fields, "offset"}:
            state["dataset_state"] = resume_after([st["dataset_state"] for st in states])
            loader.load_state_dict(state)
            c = state["dataset_state"]
            logger.info(f"data-parallel degree changed {old_dp} -> {dp}: the text stream continues at "
                        f"document {c['doc']} of epoch {c['epoch']}, after every document the old ranks used")
        elif isinstance(ds, dict) and set(ds) == MIXTURE_STATE:
            state["dataset_state"] = mixture_resume_after([st["dataset_state"] for st in states], self.dp_rank)
            loader.load_state_dict(state)
            logger.info(f"data-parallel degree changed {old_dp} -> {dp}: each source of the mixture continues after "
                        "every document the old ranks used of it")
        else:
            logger.warning(f"data-parallel degree changed {old_dp} -> {dp} and this dataset's loader state "
                           "cannot be resharded: the data stream restarts from its beginning")

    def _trim_metrics(self, step: int) -> None:
        """Drop records of steps after the checkpoint (logged before a crash), and a line torn by
        the crash; the resumed run appends them again."""
        if not self.metrics_file.exists():
            return
        lines = self.metrics_file.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.endswith("\n") and _logged_step(ln) <= step]
        if len(kept) != len(lines):
            self.metrics_file.write_text("".join(kept))

    def _load_weights(self, path: Path) -> None:
        """Model weights only, from a DCP checkpoint folder or a model.pt of export_final."""
        model = self.model
        if path.is_file():  # rank 0 reads the full state dict; set_model_state_dict scatters it
            full = torch.load(path, map_location="cpu", weights_only=True) if self.rank == 0 else {}
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        elif (path / ".metadata").is_file():
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(model, state["model"])
        else:
            raise FileNotFoundError(f"checkpoint.initial_load_path {path}: neither a DCP checkpoint folder "
                                    "(with .metadata) nor a model.pt file")
        logger.info(f"initialized the model from {path} (fresh optimizer and schedule, step 0)")

    # ---- save -----------------------------------------------------------------------------

    def maybe_save(self, step: int, last: bool = False) -> None:
        """After each step: save on the interval, at the last step and on SIGTERM (then exit)."""
        if self.pending is not None and self.pending[0].done():
            self._wait()  # publish a finished async save promptly
        signum = self._stop_agreed()
        stop = bool(signum) and not last  # at the last step the run simply ends
        if self.ck.enable and (last or stop or step % self.ck.interval == 0):
            self.save(step)
        if last and self.ck.last_save_in_hf:
            export_hf(self.model, model_args(self.cfg.model), self.cfg, self.folder / f"step-{step}-hf", self.pg)
        if last and self.ck.export_final:
            self.export()
        if stop:
            self._wait()
            if signum == signal.SIGTERM:
                logger.warning(f"SIGTERM: saved step-{step}; exiting with code {EXIT_SIGTERM}")
                raise SystemExit(EXIT_SIGTERM)
            if self.rank == 0:
                logger.warning(f"Ctrl-C: saved step-{step} in {self.folder}; exiting with code {EXIT_INTERRUPTED} "
                               "(the same command resumes there)")
            raise SystemExit(EXIT_INTERRUPTED)

    def _stop_agreed(self) -> int:
        """The stop signal (SIGTERM, else SIGINT) if any rank got one, on every rank: all must save the
        same step, together; 0 for none."""
        if not self.watch_sigterm:
            return 0
        mine = signal.SIGTERM if self.sigterm else signal.SIGINT if CTRL_C.requested else 0
        flag = torch.tensor([float(mine)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def save(self, step: int) -> None:
        self._wait()  # one save in flight at a time
        tmp = self.folder / f"step-{step}.tmp"
        start = time.perf_counter()
        state = self._state()
        if self.ck.async_mode != "async":
            dcp.save(state, checkpoint_id=str(tmp), process_group=self.pg)
            self._publish(step)
            logger.info(f"saved checkpoint step-{step} in {time.perf_counter() - start:.2f}s")
        else:  # returns once the state is copied; writing goes on in a background thread
            self.pending = (dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.pg), step)
            logger.info(f"checkpoint step-{step}: staged in {time.perf_counter() - start:.2f}s, "
                        "writing in the background")

    def _wait(self) -> None:
        if self.pending is not None:
            future, step = self.pending
            self.pending = None
            future.result()
            self._publish(step)

    def _finish_interrupted_saves(self) -> None:
        """A step-N.tmp with DCP's .metadata was complete when the run stopped before renaming it:
        publish it. One without is a save that did not finish: remove it."""
        for tmp in self.folder.glob("step-*.tmp"):
            if (tmp / ".metadata").is_file():
                logger.warning(f"publishing {tmp}: complete, but not yet renamed when the run stopped")
                self._rename(tmp, tmp.with_suffix(""))
            else:
                logger.warning(f"removing incomplete checkpoint {tmp} (a save that did not finish)")
                shutil.rmtree(tmp)
        for old in self.folder.glob("step-*.old"):  # replaced by a newer save of its step
            shutil.rmtree(old)

    @staticmethod
    def _rename(tmp: Path, final: Path) -> None:
        """tmp -> final; an existing final (same step, an earlier abandoned timeline) is moved aside
        first, so that a crash in between leaves one of the two complete under a known name."""
        if final.exists():
            os.rename(final, final.with_suffix(".old"))
        os.rename(tmp, final)
        shutil.rmtree(final.with_suffix(".old"), ignore_errors=True)

    def _publish(self, step: int) -> None:
        """Rank 0 renames step-N.tmp to step-N and prunes old ones. Called when DCP's save has
        returned on rank 0 (its coordinator), i.e. after every rank's data and the metadata exist."""
        if self.rank != 0:
            return
        self._rename(self.folder / f"step-{step}.tmp", self.folder / f"step-{step}")
        if self.ck.keep_latest_k > 0:
            found = complete_checkpoints(self.folder)
            for old in sorted(found)[:-self.ck.keep_latest_k]:
                shutil.rmtree(found[old])

    def export(self) -> None:
        """The full model state dict in one file (rank 0 writes; every rank takes part in the gather)."""
        full = get_model_state_dict(self.model,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / "model.pt"
            torch.save(full, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            logger.info(f"exported the model weights to {path}")

    def close(self) -> None:
        """Finish an async save in flight; give SIGTERM its previous handler back."""
        try:
            self._wait()
        finally:
            if self.watch_sigterm:
                signal.signal(signal.SIGTERM, self.prev_handler or signal.SIG_DFL)
