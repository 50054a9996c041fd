"""The trainer: build -> parallelize -> train. Run under torchrun (see run_train.sh):

    torchrun --standalone --nproc_per_node N -m torchtitan_sp.train --config debug_model.toml
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import get_error_handler
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.attention import SDPBackend, sdpa_kernel

warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata's own deprecation noise

from torchtitan_sp.attention.sharding import IGNORE_INDEX, shard_sequence
from torchtitan_sp.checkpoint import CheckpointManager, TrainState
from torchtitan_sp.config import Config
from torchtitan_sp.data import build_dataloader
from torchtitan_sp.data.sources import data_metrics
from torchtitan_sp.data.summary import describe_data
from torchtitan_sp.data.text import DataError
from torchtitan_sp.evaluate import Evaluator
from torchtitan_sp.interrupt import EXIT_INTERRUPTED
from torchtitan_sp.interrupt import install as install_ctrl_c
from torchtitan_sp.loss import compiled_cross_entropy_sum, cross_entropy_sum, model_loss_sum
from torchtitan_sp.memory_model import GIB, Setup, estimate
from torchtitan_sp.memory_report import host_advice, host_mem_gib
from torchtitan_sp.metrics import MetricsLogger, flops_per_token, peak_tflops, use_color
from torchtitan_sp.models.llama3 import Transformer, init_weights
from torchtitan_sp.models.shape import model_args, rope_text
from torchtitan_sp.optim import build_lr_scheduler, build_optimizer, restore_hyperparameters
from torchtitan_sp.parallel_dims import ParallelDims
from torchtitan_sp.parallelize import parallelize_llama
from torchtitan_sp.progress import Heartbeat
from torchtitan_sp.rules import load_and_validate

logger = logging.getLogger("torchtitan_sp")
CUDA_SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                      SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def init_logging(rank: int) -> None:
    # Every rank logs; run_train.sh's LOG_RANK picks which ranks' output is shown.
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s rank" + str(rank) + "] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def init_distributed(cfg: Config) -> torch.device:
    """NCCL on GPUs, gloo on CPU processes; works for one process without torchrun too."""
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, default)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if not dist.is_initialized():  # tests may have set one up already
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.comm.init_timeout_seconds))
    return device


def set_collective_timeout(seconds: int, keep: tuple[dist.ProcessGroup, ...] = ()) -> None:
    """After the first step, a dead or hung rank should fail the others within the training timeout.

    Every group needs it: the mesh dims' groups, and those that strategies such as usp create for
    themselves, are separate from the default one and keep the timeout they were created with
    (measured with gloo: a collective on a cp subgroup ran into the init timeout when only the
    default group was shortened). Groups in `keep` (checkpoint saves') keep their own."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world
    try:
        for group in list(_world.pg_map):  # every group of this process, the default one included
            if group not in keep:
                _set_pg_timeout(datetime.timedelta(seconds=seconds), group)
    except (RuntimeError, AttributeError) as e:  # not supported by every backend/version
        logger.warning(f"could not shorten the collective timeout: {e}")


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims):
        self.cfg, self.dims = cfg, dims
        self.device = init_distributed(cfg)
        self.rank = dist.get_rank()
        init_logging(self.rank)
        torch.manual_seed(cfg.debug.seed)
        if cfg.debug.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.meshes = dims.build_mesh(self.device.type)
        self.cp_rank = self.meshes["cp"].get_local_rank()
        dp_rank = self.meshes["dp"].get_local_rank()

        # Build on the meta device, parallelize, then materialize and initialize.
        self.model_args = model_args(cfg.model)
        with torch.device("meta"):
            model = Transformer(self.model_args)
        self.n_params = sum(p.numel() for p in model.parameters())
        # On CPU compute in fp32 (bf16 matmuls there are slow and inexact); on GPU as configured.
        self.param_dtype = cfg.training.mixed_precision_param if self.device.type == "cuda" else "float32"
        self.applied = parallelize_llama(model, self.meshes, cfg, self.param_dtype)
        # The sharded fp32 weights live where the optimizer steps: on the host under CPU offload.
        self.param_device = torch.device("cpu") if cfg.training.enable_cpu_offload else self.device
        model.to_empty(device=self.param_device)
        init_weights(model, cfg.debug.seed)
        model.train()
        self.model = model
        # Compiled cross-entropy needs plain logits (under TP they are vocabulary-sharded DTensors).
        self.ce = compiled_cross_entropy_sum() if cfg.compile.enable and dims.tp == 1 else cross_entropy_sum
        if self.ce is not cross_entropy_sum:
            self.applied.append("compiled loss")

        self.optimizer = build_optimizer(model.parameters(), cfg.optimizer)
        self.dataloader = build_dataloader(cfg, self.model_args.vocab_size, dp_rank, dims.dp)
        self.grad_accum = dims.grad_accum_steps(cfg)
        t = cfg.training
        self.tokens_per_step = t.local_batch_size * t.seq_len * dims.dp * self.grad_accum  # global
        self.train_state = TrainState()

        self.checkpointer = None
        ck = cfg.checkpoint
        if ck.enable or ck.initial_load_path or ck.export_final or ck.last_save_in_hf:
            self.checkpointer = CheckpointManager(cfg, self.model, self.optimizer, self.dataloader, self.train_state,
                                                  self.meshes["dp"])
            self.checkpointer.load()
            if self.step:  # resumed
                restore_hyperparameters(self.optimizer, cfg.optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.training.steps, cfg.lr_scheduler, self.step)

        self.metrics = MetricsLogger(Path(cfg.job.dump_folder), cfg.metrics.enable_tensorboard,
                                     color=use_color(cfg.metrics.disable_color_printing), active=self.rank == 0,
                                     first_step=self.step + 1, total_steps=cfg.training.steps)
        self.flops_per_token = flops_per_token(self.model_args, self.n_params, cfg.training.seq_len)
        self.peak = peak_tflops(self.device)
        self._summary()
        self.evaluator = Evaluator(self) if cfg.validation.enable else None

    # The loop's counters live in the train state that the checkpoint saves and restores.
    @property
    def step(self) -> int:
        return self.train_state.step

    @step.setter
    def step(self, value: int) -> None:
        self.train_state.step = value

    @property
    def tokens_seen(self) -> int:
        return self.train_state.tokens_seen

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self.train_state.tokens_seen = value

    def _summary(self) -> None:
        cfg, d = self.cfg, self.dims
        t = cfg.training
        n_emb = self.model_args.vocab_size * self.model_args.dim
        logger.info(f"{cfg.job.description or cfg.job.config_file or 'default config'}: Llama 3 {cfg.model.flavor}, "
                    f"{self.n_params:,} parameters ({self.n_params - n_emb:,} without embedding), "
                    f"{rope_text(self.model_args)}")
        logger.info(f"mesh dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} x cp {d.cp} x tp {d.tp} "
                    f"on {d.world_size} {self.device.type} ranks; applied: {', '.join(self.applied)}")
        between = f", {t.seq_len // (d.cp * d.tp)} per rank between blocks with tp" if d.tp > 1 else ""
        logger.info(f"seq_len {t.seq_len} ({t.seq_len // d.cp} tokens per cp rank{between}), "
                    f"local batch {t.local_batch_size}, "
                    f"global batch {t.local_batch_size * d.dp * self.grad_accum} sequences = "
                    f"{self.tokens_per_step:,} tokens "
                    f"per step, gradient accumulation {self.grad_accum}, compute dtype {self.param_dtype}")
        for level, line in describe_data(cfg, self.dataloader.dataset, self.tokens_per_step * t.steps):
            logger.log(level, line)
        self._memory_summary()

    def _memory_summary(self) -> None:
        """The estimator's peak for this run (python -m torchtitan_sp.estimate prints the breakdown),
        and a warning when it will not fit the GPU or the host."""
        setup = Setup.from_config(self.cfg, self.dims, self.device.type)
        est = estimate(setup, self.grad_accum)
        line = f"estimated peak memory per rank {est['peak'] / GIB:.2f} GiB ({est['peak phase']})"
        if self.device.type != "cuda":
            logger.info(line)
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        logger.info(f"{line}, {est['reserved'] / GIB:.1f} GiB reserved, of {total / GIB:.1f} GiB")
        if est["reserved"] > total:
            logger.warning(f"the estimate exceeds this GPU's {total / GIB:.1f} GiB: expect out-of-memory; "
                           "`python -m torchtitan_sp.estimate` with this run's arguments lists what fits")
        # Offloaded block inputs and CPU-offloaded states share the node's RAM.
        if host := host_advice(setup, host_mem_gib(), self.dims.world_size, self.grad_accum):
            (logger.warning if "does not fit" in host else logger.info)(host)

    def _save_run_config(self) -> None:
        """<dump_folder>/config.json: the resolved configuration (recipe + overrides) and where it ran,
        rewritten by every (re)start of the run after its first step."""
        d = self.dims
        record = {"config": self.cfg.to_dict(), "started_at_step": self.step - 1, "world_size": d.world_size,
                  "mesh": {"dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "cp": d.cp, "tp": d.tp},
                  "applied": self.applied, "device": torch.cuda.get_device_name() if self.device.type == "cuda"
                  else "cpu", "torch": torch.__version__}
        path = Path(self.cfg.job.dump_folder) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)  # never a half-written file

    # ---- one optimizer step -------------------------------------------------------------

    def _shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's tokens: the cp shard of every (B, S) tensor (cp ranks share one sample)."""
        out = {}
        for key, t in batch.items():
            t = t.to(self.device)
            if self.dims.cp > 1:
                t = shard_sequence(t, self.cp_rank, self.dims.cp, self.cfg.parallelism.load_balance)
            out[key] = t
        return out

    def _step_context(self) -> contextlib.ExitStack:
        """Context of forward + backward: loss-parallel cross-entropy on vocabulary shards when TP
        shards the output projection; on GPUs, SDPA tries cuDNN attention first (about 1.8x the
        flash kernel on H100, also for the blocks of a ring)."""
        stack = contextlib.ExitStack()
        if self.dims.tp > 1 and not self.cfg.parallelism.disable_loss_parallel:
            stack.enter_context(loss_parallel())
        if self.device.type == "cuda":
            stack.enter_context(sdpa_kernel(CUDA_SDPA_PRIORITY, set_priority=True))
        return stack

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        # Valid labels of the whole global batch, counted before cp sharding (cp ranks hold the
        # same samples, so the sum runs over dp only). Kept on the device: no host sync before forward.
        local_valid = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        counts = torch.tensor([local_valid], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, group=self.meshes["dp"].get_group())
        global_valid = counts[0]
        denominator = global_valid.clamp(min=1.0)  # a batch of padding only gives loss 0, not NaN

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            b = self._shard(mb)
            with self._step_context():
                # Sum over this rank's valid tokens.
                mb_loss = model_loss_sum(self.model, b, self.cfg.training.document_masks, ce=self.ce)
                (mb_loss / denominator.float()).backward()
            if isinstance(mb_loss, DTensor):  # loss-parallel under TP: replicated over tp
                mb_loss = mb_loss.full_tensor()
            loss_sum += mb_loss.detach().to(torch.float64)

        # Global average loss: every rank's sum over dp x cp / the global count, the same
        # number a run without cp or dp logs. Max: the worst data-parallel group's mean.
        total = loss_sum.clone()
        dist.all_reduce(total, group=self.meshes["dp_cp"].get_group())
        loss = total / denominator
        group_loss = loss_sum.clone()
        dist.all_reduce(group_loss, group=self.meshes["cp"].get_group())
        group_loss /= max(local_valid, 1)
        dist.all_reduce(group_loss, op=dist.ReduceOp.MAX, group=self.meshes["dp"].get_group())

        # A finite loss can still come with inf/NaN gradients (overflow in backward): check both,
        # or one such step silently poisons every weight. Every rank holds the same numbers.
        norm = self._grad_norm()
        fused = self.cfg.optimizer.implementation == "fused"
        if fused:  # before the host sync: the kernel clips, and skips a non-finite step, on the device
            self._fused_step(norm, torch.isfinite(loss) & torch.isfinite(norm))
        loss, loss_max, grad_norm, valid = torch.stack([loss, group_loss, norm.double(), global_valid]).tolist()
        what = f"step {self.step + 1}: loss is {loss}, gradient norm {grad_norm}"
        if math.isfinite(loss) and math.isfinite(grad_norm):
            if not fused:
                self._clip_and_step(norm)
        elif self.cfg.training.skip_nonfinite_loss:
            logger.warning(f"{what}; skipping the optimizer step")
        else:
            raise FloatingPointError(f"{what}; stopping (set training.skip_nonfinite_loss to skip such steps)")
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]  # the lr this step used, before the schedule moves on
        self.scheduler.step()
        self.tokens_seen += int(valid)
        return {"loss": loss, "loss_max": loss_max, "grad_norm": grad_norm, "lr": lr}

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.grad is not None]

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients, a plain fp32 tensor on this rank's device (the gradients
        are on the host under CPU offload)."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self._params_with_grad()], foreach=True)
        if isinstance(norm, DTensor):  # partial over the FSDP (and TP) mesh
            norm = norm.full_tensor()
        return norm.float().to(self.device)

    def _clip_and_step(self, norm: torch.Tensor) -> None:
        """foreach / for-loop AdamW: scale the gradients to max_norm first, then step."""
        if self.cfg.training.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params_with_grad(), self.cfg.training.max_norm, norm,
                                                 foreach=True)
        self.optimizer.step()

    def _fused_step(self, norm: torch.Tensor, finite: torch.Tensor) -> None:
        """The fused AdamW kernel clips and skips by itself, through the two tensors GradScaler
        hands it (grads are divided by `grad_scale`; the step is a no-op while `found_inf` is 1):
        one pass less over the gradients than clip-then-step, and no host sync before the step.
        (torch.optim.AdamW reads these attributes for GradScaler; they are not a documented API.)"""
        max_norm = self.cfg.training.max_norm
        # clip_grads_with_norm_ multiplies by min(max_norm / (norm + 1e-6), 1): divide by the inverse.
        scale = ((norm + 1e-6) / max_norm).clamp(min=1.0) if max_norm > 0 else None
        # The kernel wants them beside the parameters (on the host under CPU offload).
        self.optimizer.grad_scale = None if scale is None else scale.to(self.param_device)
        self.optimizer.found_inf = (~finite).float().to(self.param_device)
        self.optimizer.step()

    # ---- the loop -----------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        data_iter = iter(self.dataloader)
        first_step = self.step + 1  # > 1 when resumed from a checkpoint
        if self.step >= cfg.training.steps and not cfg.validation.eval_only:
            logger.warning(f"resumed at step {self.step} >= training.steps {cfg.training.steps}: nothing to train "
                           "(raise training.steps to continue)")
        window_start, data_time, window_steps = time.perf_counter(), 0.0, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        heartbeat = Heartbeat(cfg.training.steps, self.step, logger.info) if self.rank == 0 else None
        try:
            if self.evaluator is not None and cfg.validation.eval_only:
                self.evaluator.run_eval_only()
                return
            while self.step < cfg.training.steps:
                t0 = time.perf_counter()
                if self.step + 1 == first_step and cfg.compile.enable:
                    logger.info("torch.compile: compiling the blocks during the first step (can take minutes)")
                micro_batches = [next(data_iter) for _ in range(self.grad_accum)]
                data_time += time.perf_counter() - t0
                out = self.train_step(micro_batches)
                self.step += 1
                window_steps += 1
                if heartbeat is not None:
                    heartbeat.step_done(self.step)
                if self.step == first_step:
                    if cfg.compile.enable:
                        logger.info(f"torch.compile: done; the first step took {time.perf_counter() - t0:.1f}s")
                    saves = self.checkpointer.pg if self.checkpointer is not None else None
                    set_collective_timeout(cfg.comm.train_timeout_seconds, keep=(saves,) if saves else ())
                    if self.rank == 0:  # once a step has run: a run that fails earlier overwrites nothing
                        self._save_run_config()
                if self.step % cfg.metrics.log_freq == 0 or self.step == cfg.training.steps:
                    elapsed = time.perf_counter() - window_start
                    self._log(out, elapsed, data_time, window_steps)
                    window_start, data_time, window_steps = time.perf_counter(), 0.0, 0
                if self.evaluator is not None and self.evaluator.due(self.step):
                    window_start += self.evaluator.run(self.step)  # not training time
                if self.checkpointer is not None:
                    self.checkpointer.maybe_save(self.step, last=self.step == cfg.training.steps)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            if self.checkpointer is not None:
                self.checkpointer.close()
            self.metrics.close()
        logger.info(f"training done: {self.step} steps, {self.tokens_seen:,} tokens")

    def _log(self, out: dict[str, Any], elapsed: float, data_time: float, steps: int) -> None:
        tps = self.tokens_per_step * steps / self.dims.world_size / elapsed  # per device
        tflops = self.flops_per_token * tps / 1e12
        m = {"loss": out["loss"], "loss_max": out["loss_max"], "grad_norm": out["grad_norm"],
             "lr": out["lr"], "tps": tps, "tokens_seen": self.tokens_seen,
             "tflops": tflops if self.device.type == "cuda" else None,
             "mfu": 100 * tflops / self.peak if self.peak else None,
             "mem_gib": None, "data_pct": 100 * data_time / elapsed, "s_per_step": elapsed / steps,
             **data_metrics(self.dataloader.dataset, self.meshes["dp"].get_group(), self.device)}
        if self.device.type == "cuda":
            m["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            m["mem_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.metrics.log(self.step, m)


def main(argv: list[str] | None = None) -> int:
    """Train; the exit code is 0, or 143 (SIGTERM) / 130 (Ctrl-C) when a signal stopped the run after
    saving a checkpoint, or 130 when Ctrl-C aborted it."""
    install_ctrl_c()
    cfg, dims = load_and_validate(argv)
    trainer = Trainer(cfg, dims)
    try:
        trainer.train()
    except SystemExit as e:
        return int(e.code)
    except Exception as e:
        e.step = trainer.step + 1  # for the one-line report in __main__
        raise
    except KeyboardInterrupt:
        if trainer.rank == 0:
            saved = ("the newest checkpoint is kept" if cfg.checkpoint.enable
                     else "nothing saved (checkpoint.enable is off)")
            logger.warning(f"Ctrl-C: stopped during step {trainer.step + 1}; {saved}; exiting with code "
                           f"{EXIT_INTERRUPTED}")
        return EXIT_INTERRUPTED
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # bad input: load_and_validate exits 2
        code = e.code if isinstance(e.code, int) else 1
    except DataError as e:  # a bad record the start-up scan did not reach: one line, exit 2 as before launch
        print(f"error: {e}", file=sys.stderr)
        get_error_handler().record_exception(e)
        code = 2
    except KeyboardInterrupt:  # Ctrl-C before training started
        print(f"Ctrl-C: stopped before training started; exiting with code {EXIT_INTERRUPTED}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException as e:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:  # under torchrun: one line on the console, the traceback in this rank's error file
            what = (str(e).splitlines() or [""])[0]
            step = f", step {e.step}" if hasattr(e, "step") else ""
            print(f"error: rank {os.environ.get('RANK', '0')}{step}: {type(e).__name__}: {what} "
                  f"(traceback: {error_file})", file=sys.stderr)
        else:
            traceback.print_exc()
        # run_train.sh's failure summary reads this file, also for ranks whose output LOG_RANK hides.
        get_error_handler().record_exception(e)
        code = 1
    # Leave without interpreter finalization: a gloo worker thread can still be releasing its last
    # collective's tensors, and their Python decref during finalization aborts the process
    # ("terminate called without an active exception", exit -6; seen under CPU load, pytorch#179291).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
