"""Config loading, overrides, validation errors (one line, exit 2, nothing written), mesh shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan_sp.config import Config, ConfigError, help_text, load_config
from torchtitan_sp.rules import check_local_gpus, validate
from torchtitan_sp.validate import main as validate_main

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_recipe():
    cfg = load_config([])  # no --config: the debug recipe
    assert cfg.model.flavor == "debug" and cfg.job.config_file.endswith("debug_model.toml")
    assert cfg.training.steps == 30
    bare = load_config(["--config", ""])  # dataclass defaults only
    assert bare.training.steps == Config().training.steps


def test_precedence_cli_over_toml_over_defaults():
    cfg = load_config(["--config", "llama8b_cp4.toml", "--parallelism.context_parallel_degree", "8",
                       "--training.seq_len=16384", "--compile.enable", "false", "--job.dry_run"])
    assert cfg.parallelism.context_parallel_degree == 8  # CLI over TOML (4)
    assert cfg.training.seq_len == 16384
    assert cfg.compile.enable is False
    assert cfg.job.dry_run is True  # a bare flag switches a boolean on
    assert cfg.parallelism.data_parallel_shard_degree == 2  # from TOML
    assert cfg.optimizer.beta2 == 0.95  # default


def test_config_path_and_name(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[training]\nsteps = 7\n")
    assert load_config(["--config", str(p)]).training.steps == 7
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", "nope.toml"])


@pytest.mark.parametrize("argv, pattern", [
    (["--trainin.steps", "3"], "unknown config section 'trainin'"),
    (["--training.stepz", "3"], "unknown config key 'training.stepz'.*steps"),
    (["--training.steps", "three"], "training.steps: expected an integer"),
    (["--optimizer.lr", "fast"], "optimizer.lr: expected a number"),
    (["--compile.enable", "maybe"], "compile.enable: expected true or false"),
    (["--activation_checkpoint.mode", "some"],
     "activation_checkpoint.mode: 'some' is not valid; choose one of none | full | selective"),
    (["--parallelism.context_parallel_strategy", "zigzag"], "ring \\| ulysses \\| usp \\| allgather"),
    (["--training.seq_len", "0"], "training.seq_len: must be >= 1"),
    (["steps"], "unexpected argument"),
    (["--activation_checkpoint.offload", "--activation_checkpoint.mode", "selective"],
     "activation_checkpoint.offload: needs activation_checkpoint.mode = 'full'"),
    (["--model.n_layers", "-1"], "model.n_layers: must be >= 0 \\(0 = the flavor's\\), got -1"),
    (["--optimizer.lr", "nan"], "optimizer.lr: must be > 0, got nan"),
    (["--optimizer.beta1", "2"], "optimizer.beta1: must be in \\[0, 1\\), got 2"),
    (["--optimizer.weight_decay", "-0.1"], "optimizer.weight_decay: must be >= 0"),
    (["--lr_scheduler.warmup_steps", "-3"], "lr_scheduler.warmup_steps: must be >= 0, got -3"),
    (["--lr_scheduler.min_lr_factor", "1.5"], "lr_scheduler.min_lr_factor: must be in \\[0, 1\\]"),
    (["--comm.train_timeout_seconds", "0"], "comm.train_timeout_seconds: must be > 0, got 0"),
    (["--checkpoint.load_step", "20"], "checkpoint.load_step: resuming from step 20 needs checkpoint.enable = true"),
])
def test_bad_keys_and_types(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(argv)


def test_bad_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[training]\nsteps = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(p)])
    p.write_text("[training]\nsequence = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'training.sequence'"):
        load_config(["--config", str(p)])
    p.write_bytes(b"[training]\nsteps = 3 # \xff\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML: 'utf-8' codec can't decode"):
        load_config(["--config", str(p)])
    with pytest.raises(ConfigError, match="is a folder; give a .toml file"):
        load_config(["--config", str(tmp_path)])


def test_help_lists_every_key():
    text = help_text()
    cfg = Config()
    for section, values in cfg.to_dict().items():
        for key in values:
            assert f"--{section}.{key} " in text
    assert "Tokens per sequence" in text  # the field docs are shown


@pytest.mark.parametrize("argv, world, shape", [
    ([], 4, (1, 4, 1, 1)),
    (["--parallelism.context_parallel_degree", "2"], 4, (1, 2, 2, 1)),
    (["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.tensor_parallel_degree", "2"], 8,
     (2, 2, 1, 2)),
    (["--config", "llama8b_cp4.toml"], 8, (1, 2, 4, 1)),
    (["--config", "llama8b_cp4.toml", "--parallelism.context_parallel_degree", "8",
      "--parallelism.data_parallel_shard_degree", "-1"], 8, (1, 1, 8, 1)),
])
def test_mesh_shapes(argv, world, shape):
    d = validate(load_config(argv), world)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp) == shape


@pytest.mark.parametrize("argv, world, pattern", [
    (["--parallelism.context_parallel_degree", "3"], 4, "= 3 does not divide the world size 4"),
    (["--parallelism.data_parallel_shard_degree", "3"], 4, "= 3, but the world size is 4"),
    (["--parallelism.context_parallel_degree", "2", "--training.seq_len", "66"], 4,
     "training.seq_len 66 is not divisible by 2 x cp x tp = 2 x 2 x 1 = 4"),
    (["--parallelism.tensor_parallel_degree", "3", "--parallelism.data_parallel_shard_degree", "1"], 3,
     "tensor_parallel_degree 3 must divide the model's heads"),
    (["--training.global_batch_size", "5"], 2, "global_batch_size 5 must be a multiple of"),
    (["--activation_checkpoint.tiled_mlp_shards", "4", "--parallelism.tensor_parallel_degree", "2"], 2,
     "tiled_mlp_shards 4 does not combine with tensor_parallel_degree 2"),
    (["--activation_checkpoint.tiled_mlp_shards", "200", "--parallelism.context_parallel_degree", "2"], 2,
     "tiled_mlp_shards: at most the 128 tokens per cp rank, got 200"),
    (["--job.dump_folder", __file__], 1, "job.dump_folder: .*test_config.py is a file, not a folder"),
])
def test_mesh_errors(argv, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(load_config(argv), world)


def _validate_cli(args: list[str], world: int = 4) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORLD_SIZE": str(world)}
    return subprocess.run([sys.executable, "-m", "torchtitan_sp.validate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_exit_2_with_one_line(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "metrics.jsonl").write_text("precious\n")
    before = sorted(p.name for p in dump.iterdir())
    for args in (["--training.stepz", "1"], ["--parallelism.context_parallel_degree", "3"],
                 ["--config", "missing.toml"]):
        r = _validate_cli([*args, "--job.dump_folder", str(dump)])
        assert r.returncode == 2, r.stderr
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert sorted(p.name for p in dump.iterdir()) == before
    assert (dump / "metrics.jsonl").read_text() == "precious\n"


def test_more_processes_than_gpus_is_one_line():
    check_local_gpus(8, 8)
    check_local_gpus(4, 0)  # no GPU: CPU processes over gloo
    with pytest.raises(ConfigError,
                       match=r"^8 processes per node .* only 4 GPU\(s\) are visible on this node; set it <= 4"):
        check_local_gpus(8, 4)


def test_fp32_ring_on_gpus_is_one_line(monkeypatch):
    argv = ["--parallelism.context_parallel_degree", "2", "--training.mixed_precision_param", "float32"]
    validate(load_config(argv), 2)  # CPU processes compute in fp32 anyway
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(ConfigError, match="float32 on GPUs does not combine with context_parallel_strategy 'ring'"):
        validate(load_config(argv), 2)
    validate(load_config([*argv, "--parallelism.context_parallel_strategy", "ulysses"]), 2)


def test_several_nodes_validate_against_the_gpus_per_node(monkeypatch, capsys):
    """slurm_train.sh validates WORLD_SIZE = nodes x GPUS_PER_NODE on a node that sees GPUS_PER_NODE GPUs."""
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a GPU node: no CPU host-memory check
    argv = ["validate", "--config", "llama8b_cp4.toml", "--parallelism.data_parallel_shard_degree", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "32")
    for per_node, code in (("8", None), ("16", 2)):
        monkeypatch.setenv("NPROC_PER_NODE", per_node)
        if code is None:
            validate_main()
        else:
            with pytest.raises(SystemExit) as e:
                validate_main()
            assert e.value.code == code and "16 processes per node" in capsys.readouterr().err


def test_run_train_bad_input_exits_2(tmp_path):
    r = subprocess.run(["./run_train.sh", "--training.seq_len", "abc", "--job.dump_folder", str(tmp_path / "d")],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "NGPU": "2"})
    assert r.returncode == 2
    assert "training.seq_len: expected an integer" in r.stderr
    assert not (tmp_path / "d").exists()


def test_help_exits_0():
    r = subprocess.run(["./run_train.sh", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NGPU": "1"})
    assert r.returncode == 0 and "--parallelism.context_parallel_degree" in r.stdout


def test_readme_config_reference_is_current():
    """The README's configuration reference is `--help`'s text: regenerate it when a key changes."""
    assert help_text() in (REPO / "README.md").read_text()
