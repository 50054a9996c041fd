"""No silently ignored settings: every key of every section, set away from its default, either changes
what runs or is rejected before launch with one line naming both keys.

TABLE has one entry per key (a key added to config.py without one fails test_every_key_has_an_entry):
  value    a non-default value
  context  arguments under which `value` matters (for the effect)
  probe    what the value changes: a static probe computed from the resolved configuration the way the
           trainer does (mesh, model, optimizer, schedule, first batch, dry-run text ...) or a "run:" probe,
           read from a real one-process training run (files written, log lines, process-group timeouts)
  trigger  for keys in meaningful.RULES: arguments under which `value` is ignored, so it must be rejected
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import free_port, run_distributed
from tests.trainer_utils import read_metrics
from torchtitan_sp.attention.sharding import shard_sequence
from torchtitan_sp.config import CHOICES, Config, ConfigError, load_config
from torchtitan_sp.data import build_dataloader
from torchtitan_sp.evaluate import describe_evaluation
from torchtitan_sp.meaningful import RULES, check_meaningful
from torchtitan_sp.metrics import use_color
from torchtitan_sp.models.hf import hf_config
from torchtitan_sp.models.llama3 import FLAVORS, Transformer, init_weights
from torchtitan_sp.models.shape import model_args
from torchtitan_sp.optim import build_optimizer, lr_factor
from torchtitan_sp.parallel_dims import ParallelDims
from torchtitan_sp.rules import validate

REPO = Path(__file__).resolve().parent.parent
WORLD = 4  # static probes plan a 4-process run
BASE = ["--config", "", "--training.seq_len", "64"]  # dataclass defaults, test-sized
ENABLE = ["--checkpoint.enable"]
CP2 = ["--parallelism.context_parallel_degree", "2"]


@dataclass
class Entry:
    value: str
    probe: str
    context: list[str] = field(default_factory=list)
    trigger: list[str] | None = None  # set for keys in meaningful.RULES


def _tokenizer_half(tmp: Path) -> str:
    """The shipped tokenizer without its last half of merges: another tokenization of the same text."""
    lines = (REPO / "assets/tokenizer/tokenizer.model").read_text().splitlines()
    path = tmp / "half.model"
    path.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    return str(path)


def table(tmp: Path) -> dict[str, Entry]:
    docs = []
    for name in ("a", "b"):  # a document for each of the 4 data-parallel ranks
        text = " ".join(f"{name}{i}" for i in range(400))
        (tmp / f"{name}.jsonl").write_text("".join(f'{{"text": "{d} {text}"}}\n' for d in range(4)))
        docs.append(str(tmp / f"{name}.jsonl"))
    files = ["--training.dataset", "files", "--training.dataset_path", docs[0]]
    stdlib = ["--training.dataset", "stdlib"]
    conversations = []  # 8 for the 4 data-parallel ranks; rank 0's first is longer than seq_len 256
    for i in range(8):
        words = " ".join(f"w{i}x{j}" for j in range(150 if i == 0 else 3))
        conversations.append(json.dumps({"messages": [{"role": "user", "content": f"question {i} {words}"},
                                                      {"role": "assistant", "content": f"answer {i}"}]}))
    (tmp / "chat.jsonl").write_text("\n".join(conversations) + "\n")
    chat = ["--training.dataset", "chat", "--training.dataset_path", str(tmp / "chat.jsonl"),
            "--training.seq_len", "256"]
    val = ["--validation.enable", "--validation.dataset", "synthetic", "--validation.steps", "2"]
    hf = []  # two Hugging Face folders' config.json: the debug shape with 2 and with 1 blocks
    for layers in (2, 1):
        (tmp / f"hf{layers}").mkdir()
        config = hf_config(dataclasses.replace(FLAVORS["debug"], n_layers=layers))
        (tmp / f"hf{layers}" / "config.json").write_text(json.dumps(config))
        hf.append(str(tmp / f"hf{layers}"))
    llama3_rope = ["--model.flavor", "8B"]  # Llama 3.1's scaling: llama3, factor 8
    yarn = ["--model.rope_scaling", "yarn", "--model.rope_factor", "4"]
    passkey = [*val, "--passkey.lengths", "64"]
    return {
        "job.config_file": Entry("llama3_8b.toml", "model"),
        "job.dump_folder": Entry(str(tmp / "elsewhere"), "run:metrics_folder"),
        "job.description": Entry("a described run", "run:first_line"),
        "job.dry_run": Entry("true", "main"),
        "model.name": Entry("llama3", "only_choice"),
        "model.flavor": Entry("1B", "model"),
        "model.n_layers": Entry("1", "model"),
        "model.hf_assets_path": Entry(hf[1], "model", ["--model.flavor", "hf", "--model.hf_assets_path", hf[0]]),
        "model.rope_theta": Entry("10000", "model"),
        "model.rope_scaling": Entry("linear", "model", llama3_rope),
        "model.rope_factor": Entry("16", "model", llama3_rope),
        "model.rope_low_freq_factor": Entry("2", "model", llama3_rope),
        "model.rope_high_freq_factor": Entry("8", "model", llama3_rope),
        "model.rope_original_max_position": Entry("4096", "model", llama3_rope),
        "model.rope_yarn_beta_fast": Entry("16", "model", yarn),
        "model.rope_yarn_beta_slow": Entry("2", "model", yarn),
        "model.rope_attention_factor": Entry("1.5", "model", yarn),
        "model.tokenizer_path": Entry(_tokenizer_half(tmp), "batch", stdlib, trigger=[]),
        "optimizer.name": Entry("AdamW", "only_choice"),
        "optimizer.lr": Entry("0.5", "optimizer"),
        "optimizer.beta1": Entry("0.5", "optimizer"),
        "optimizer.beta2": Entry("0.5", "optimizer"),
        "optimizer.eps": Entry("0.5", "optimizer"),
        "optimizer.weight_decay": Entry("0.5", "optimizer"),
        "optimizer.implementation": Entry("foreach", "optimizer"),
        "lr_scheduler.warmup_steps": Entry("5", "schedule"),
        "lr_scheduler.decay_type": Entry("cosine", "schedule"),
        "lr_scheduler.min_lr_factor": Entry("0.5", "schedule", trigger=["--lr_scheduler.decay_type", "none"]),
        "training.seq_len": Entry("128", "batch"),
        "training.local_batch_size": Entry("1", "batch"),
        "training.global_batch_size": Entry("16", "dims"),
        "training.steps": Entry("7", "schedule"),
        "training.max_norm": Entry("0.0001", "run:losses"),
        "training.dataset": Entry("stdlib", "batch"),
        "training.dataset_path": Entry(docs[1], "batch", files, trigger=[]),
        "training.packing": Entry("false", "batch", stdlib, trigger=[]),
        "training.mixed_precision_param": Entry("float32", "dry_run"),
        "training.mixed_precision_reduce": Entry("bfloat16", "run:fsdp_line"),
        "training.skip_nonfinite_loss": Entry("true", "run:nan_step"),
        "training.enable_cpu_offload": Entry("true", "dry_run"),
        "training.train_on_prompt": Entry("true", "labels", chat),
        "training.truncation": Entry("right", "batch", chat),
        "parallelism.data_parallel_replicate_degree": Entry("2", "dims"),
        "parallelism.data_parallel_shard_degree": Entry("2", "dims"),  # pins the world size: 4 is rejected
        "parallelism.context_parallel_degree": Entry("2", "dims"),
        "parallelism.tensor_parallel_degree": Entry("2", "dims"),
        "parallelism.context_parallel_strategy": Entry("ulysses", "dry_run", CP2, trigger=[]),
        "parallelism.context_parallel_rotate_method": Entry("alltoall", "dry_run", CP2, trigger=[]),
        "parallelism.context_parallel_load_balancer": Entry("none", "cp_layout", CP2, trigger=[]),
        "parallelism.context_parallel_ulysses_degree": Entry(
            "2", "dry_run", [*CP2, "--parallelism.context_parallel_degree", "4",
                             "--parallelism.context_parallel_strategy", "usp"], trigger=[]),
        "parallelism.heads_k_stride": Entry("2", "dry_run", [*CP2, "--parallelism.context_parallel_strategy",
                                                             "allgather"], trigger=[]),
        "parallelism.disable_loss_parallel": Entry(  # unchunked logits at 16K: replicated on each TP rank
            "true", "dry_run", ["--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "16384"],
            trigger=[]),
        "parallelism.enable_async_tensor_parallel": Entry(  # CUDA only: rejected here, named in the dry run there
            "true", "dry_run", ["--parallelism.tensor_parallel_degree", "2", "--compile.enable"]),
        "parallelism.fsdp_reshard_after_forward": Entry("never", "dry_run", ["--model.flavor", "1B"]),
        "activation_checkpoint.mode": Entry("full", "dry_run"),
        "activation_checkpoint.selective_ac_option": Entry("op", "dry_run", ["--activation_checkpoint.mode",
                                                                              "selective"], trigger=[]),
        "activation_checkpoint.tiled_mlp_shards": Entry("4", "dry_run"),
        "activation_checkpoint.offload": Entry("true", "dry_run", ["--activation_checkpoint.mode", "full"],
                                               trigger=["--activation_checkpoint.mode", "full"]),
        "compile.enable": Entry("true", "dry_run"),
        "metrics.log_freq": Entry("2", "run:logged_steps"),
        "metrics.enable_tensorboard": Entry("false", "run:tensorboard", ["--metrics.enable_tensorboard", "true"]),
        "metrics.disable_color_printing": Entry("true", "color"),
        "checkpoint.enable": Entry("true", "run:checkpoints"),
        "checkpoint.folder": Entry("elsewhere", "run:checkpoints", ENABLE, trigger=[]),
        "checkpoint.interval": Entry("1", "run:checkpoints", ENABLE, trigger=[]),
        "checkpoint.async_mode": Entry("async", "run:background_save", ENABLE, trigger=[]),
        "checkpoint.keep_latest_k": Entry("1", "run:checkpoints", [*ENABLE, "--checkpoint.interval", "1"], trigger=[]),
        "checkpoint.load_step": Entry("1", "run:resumed_from", [*ENABLE, "--checkpoint.interval", "1"]),
        "checkpoint.initial_load_path": Entry("{context_folder}/checkpoint/step-2", "run:initialized_from", ENABLE),
        "checkpoint.export_final": Entry("true", "run:checkpoints"),
        "checkpoint.initial_load_in_hf": Entry("true", "model"),  # without a folder to load: rejected
        "checkpoint.last_save_in_hf": Entry("true", "run:checkpoints"),
        "checkpoint.export_dtype": Entry("bfloat16", "model"),  # without last_save_in_hf: rejected
        "checkpoint.save_on_sigterm": Entry("false", "run:watches_signals", ENABLE, trigger=[]),
        "comm.init_timeout_seconds": Entry("77", "run:init_timeout"),
        "comm.train_timeout_seconds": Entry("55", "run:train_timeout"),
        "comm.checkpoint_timeout_seconds": Entry("66", "run:checkpoint_timeout", ENABLE, trigger=[]),
        "validation.enable": Entry("true", "evaluation"),
        "validation.dataset": Entry("stdlib", "evaluation", val, trigger=[]),
        "validation.dataset_path": Entry(docs[0], "evaluation", ["--validation.enable", "--validation.dataset_path",
                                                                 docs[1]], trigger=[]),
        "validation.freq": Entry("2", "evaluation", val, trigger=[]),
        "validation.steps": Entry("3", "evaluation", val, trigger=[]),
        "validation.seq_len": Entry("128", "evaluation", val, trigger=[]),
        "validation.local_batch_size": Entry("2", "evaluation", val, trigger=[]),
        "validation.eval_only": Entry("true", "evaluation", val, trigger=[]),
        "passkey.lengths": Entry("64", "evaluation", val, trigger=[]),
        "passkey.depths": Entry("0,1", "evaluation", passkey, trigger=[]),
        "passkey.trials": Entry("2", "evaluation", passkey, trigger=[]),
        "passkey.digits": Entry("3", "evaluation", passkey, trigger=[]),
        "debug.seed": Entry("1", "init"),
        "debug.deterministic": Entry("true", "run:deterministic"),
    }


# ---- static probes: (cfg, dims) -> what the trainer would build or do --------------------------

def _dry_run_text(cfg, dims) -> str:
    from torchtitan_sp.dry_run import dry_run
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dry_run(cfg, dims)
    return out.getvalue()


def _first_batch(cfg, dims, key: str = "tokens") -> list:
    loader = build_dataloader(cfg, model_args(cfg.model).vocab_size, 0, dims.dp)
    return next(iter(loader))[key].tolist()


def _optimizer(cfg, dims) -> tuple:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optimizer)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return tuple(sorted(group.items(), key=lambda kv: kv[0]))


def _init(cfg, dims) -> float:
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(FLAVORS["debug"], n_layers=1))
    init_weights(model, cfg.debug.seed)
    return float(next(model.parameters()).detach().sum())


def _main(cfg, dims) -> str:
    from torchtitan_sp.validate import main
    out, argv = io.StringIO(), ["validate", *cfg._argv]
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", argv)
        mp.setenv("WORLD_SIZE", str(WORLD))
        try:
            main()
            return "launch"
        except SystemExit as e:
            return f"exit {e.code}: {out.getvalue()[:80]}"


STATIC: dict[str, Callable[[Any, Any], Any]] = {
    "model": lambda cfg, dims: model_args(cfg.model),
    "dims": lambda cfg, dims: (astuple(dims), dims.grad_accum_steps(cfg)),
    "optimizer": _optimizer,
    "schedule": lambda cfg, dims: [lr_factor(s, cfg.training.steps, cfg.lr_scheduler)
                                   for s in range(cfg.training.steps)],
    "batch": _first_batch,
    "labels": lambda cfg, dims: _first_batch(cfg, dims, "labels"),
    "evaluation": lambda cfg, dims: describe_evaluation(cfg),
    "dry_run": _dry_run_text,
    "cp_layout": lambda cfg, dims: shard_sequence(torch.arange(cfg.training.seq_len)[None], 0, dims.cp,
                                                  cfg.parallelism.load_balance).tolist(),
    "color": lambda cfg, dims: use_color(cfg.metrics.disable_color_printing, stream=_Terminal()),
    "init": _init,
    "main": _main,
}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def outcome(argv: list[str], probe: str) -> Any:
    """The probe's value for BASE + argv, or ("rejected", message)."""
    try:
        cfg = load_config([*BASE, *argv])
        dims = validate(cfg, WORLD)
    except (ConfigError, ValueError) as e:
        return ("rejected", str(e))
    cfg._argv = [*BASE, *argv]
    return STATIC[probe](cfg, dims)


def test_every_key_has_an_entry(tmp_path: Path) -> None:
    entries = table(tmp_path)
    keys = [f"{s.name}.{f.name}" for s in fields(Config) for f in fields(s.default_factory())]
    assert sorted(keys) == sorted(entries), "every config key needs an entry in tests/test_meaningful.py TABLE"
    assert {r.key for r in RULES} == {k for k, e in entries.items() if e.trigger is not None}
    defaults = Config()
    for key, e in entries.items():
        sec, name = key.split(".")
        if e.probe == "only_choice":  # nothing else to set
            assert CHOICES[key] == (getattr(getattr(defaults, sec), name),)
            continue
        cfg = load_config([*BASE, *e.context, f"--{key}", e.value.format(context_folder=tmp_path)])
        assert getattr(getattr(cfg, sec), name) != getattr(getattr(defaults, sec), name), key


def test_ignored_values_are_rejected_naming_both_keys(tmp_path: Path) -> None:
    rules = {r.key: r for r in RULES}
    for key, e in table(tmp_path).items():
        if e.trigger is None:
            continue
        cfg = load_config([*BASE, *e.trigger, f"--{key}", e.value])
        with pytest.raises(ConfigError) as err:  # at launch on this CPU machine
            check_meaningful(cfg, ParallelDims.from_config(cfg, WORLD), "cpu")
        msg = str(err.value)
        assert msg.startswith(f"{key} = ") and rules[key].needs in msg and "\n" not in msg, msg
        if key != "activation_checkpoint.offload":  # the device rule applies at launch only (validate.main)
            with pytest.raises(ConfigError, match=f"^{re.escape(key)} = "):
                validate(cfg, WORLD)


def test_static_effects(tmp_path: Path) -> None:
    changed, same = [], []
    for key, e in table(tmp_path).items():
        if e.probe in ("only_choice",) or e.probe.startswith("run:"):
            continue
        before = outcome(e.context, e.probe)
        assert not (isinstance(before, tuple) and before[:1] == ("rejected",)), (key, before)
        after = outcome([*e.context, f"--{key}", e.value], e.probe)
        (changed if after != before else same).append(key)
    assert same == [], f"these keys change nothing their probe sees: {same}"


# ---- run probes: one process trains each configuration for 2 steps --------------------------------

def _pg_timeout(pg) -> float:
    return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _nan_step(trainer) -> str:
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    try:
        trainer.train_step([next(iter(trainer.dataloader))])
        return "skipped"
    except FloatingPointError:
        return "stopped"


RUN_PROBES: dict[str, Callable[[Any, Path, str, dict], Any]] = {
    "metrics_folder": lambda t, f, log, at_init: str(t.metrics.folder),
    "first_line": lambda t, f, log, at_init: next(ln for ln in log.splitlines() if ": Llama 3 " in ln),
    "losses": lambda t, f, log, at_init: [r["loss"] for r in read_metrics(f)],
    "fsdp_line": lambda t, f, log, at_init: [ln for ln in log.splitlines() if "reduce" in ln],
    "nan_step": lambda t, f, log, at_init: _nan_step(t),
    "logged_steps": lambda t, f, log, at_init: [r["step"] for r in read_metrics(f)],
    "tensorboard": lambda t, f, log, at_init: (f / "tb").exists(),
    "checkpoints": lambda t, f, log, at_init: sorted(str(p.relative_to(f)) for p in f.glob("*/*")
                                                      if p.name.startswith(("step-", "model.pt"))),
    "background_save": lambda t, f, log, at_init: "in the background" in log,
    "resumed_from": lambda t, f, log, at_init: re.findall(r"resumed from \S+/(step-\d+)", log),
    "initialized_from": lambda t, f, log, at_init: "initialized the model from" in log,
    "watches_signals": lambda t, f, log, at_init: at_init["watch"],
    "init_timeout": lambda t, f, log, at_init: at_init["timeout"],
    "train_timeout": lambda t, f, log, at_init: _pg_timeout(dist.group.WORLD),
    "checkpoint_timeout": lambda t, f, log, at_init: _pg_timeout(t.checkpointer.pg),
    "deterministic": lambda t, f, log, at_init: at_init["deterministic"],
}


def _run_probe(argv: list[str], folder: Path, probe: str) -> Any:
    from torchtitan_sp.train import Trainer
    os.environ["MASTER_PORT"] = str(free_port())  # the Trainer starts its own process group
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(message)s"))
    cfg = load_config(["--config", "", "--training.seq_len", "32", "--training.steps", "2", "--model.n_layers", "1",
                       "--metrics.enable_tensorboard", "false", "--job.dump_folder", str(folder), *argv])
    logging.getLogger("torchtitan_sp").addHandler(handler)  # init_logging replaces only the root's handlers
    trainer = Trainer(cfg, validate(cfg, 1))
    at_init = {"watch": trainer.checkpointer is not None and trainer.checkpointer.watch_sigterm,
               "timeout": _pg_timeout(dist.group.WORLD), "deterministic": torch.are_deterministic_algorithms_enabled()}
    try:
        trainer.train()
        return RUN_PROBES[probe](trainer, Path(cfg.job.dump_folder), log.getvalue(), at_init)
    finally:
        logging.getLogger("torchtitan_sp").removeHandler(handler)
        torch.use_deterministic_algorithms(False)
        dist.destroy_process_group()


def _run_all(rank: int, world: int, jobs: list[tuple[str, list[str], list[str], str, str]]) -> list:
    dist.destroy_process_group()  # each run below starts its own, with its configured timeout
    results = []
    for key, context, changed, probe, tmp in jobs:
        ctx_folder, key_folder = Path(tmp) / f"{key}-context", Path(tmp) / f"{key}-value"
        if key == "checkpoint.load_step":  # resumes from the context run's checkpoints
            key_folder = ctx_folder
        results.append((key, _run_probe(context, ctx_folder, probe), _run_probe(changed, key_folder, probe)))
    return results


def test_run_effects(tmp_path: Path) -> None:
    jobs = []
    for key, e in table(tmp_path).items():
        if e.probe.startswith("run:"):
            value = e.value.format(context_folder=tmp_path / f"{key}-context")
            jobs.append((key, e.context, [*e.context, f"--{key}", value], e.probe[4:], str(tmp_path)))
    same = [(key, a) for key, a, b in run_distributed(_run_all, 1, jobs)[0] if a == b]
    assert same == [], f"these keys change nothing their probe sees: {same}"


def test_a_recipe_value_set_aside_by_an_override_is_not_an_error() -> None:
    """llama3_8b.toml selects selective AC with option "op": `--activation_checkpoint.mode full` on the
    command line sets that option aside (the user chose), while giving the option itself on the command
    line next to a full mode is still an error."""
    cfg = load_config(["--config", "llama3_8b.toml", "--activation_checkpoint.mode", "full"])
    check_meaningful(cfg, ParallelDims.from_config(cfg, 8))
    cfg = load_config(["--config", "llama3_8b.toml", "--activation_checkpoint.mode", "full",
                       "--activation_checkpoint.selective_ac_option", "op"])
    with pytest.raises(ConfigError, match="^activation_checkpoint.selective_ac_option = 'op' has no effect"):
        check_meaningful(cfg, ParallelDims.from_config(cfg, 8))
