"""Hugging Face weights in and out of the real trainer, against transformers.

A tiny random LlamaForCausalLM (llama3 RoPE scaling, sharded safetensors, a tokenizer.json converted from
the shipped tokenizer.model) is loaded with checkpoint.initial_load_in_hf on 1 process and on 4 ranks
under several meshes (one launch builds them in turn); logits equal transformers'. Training from it on
dp2 x cp2 equals 1 process; exports load in transformers with the trainer's logits; load -> export is
bit-exact; a few-hundred-MB bf16 model loads on 4 ranks within half its fp32 size of extra memory per
rank. Bad inputs are one line before any process group.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.dist_utils import run_distributed
from tests.test_tokenizer import MIXED
from tests.trainer_utils import read_metrics
from torchtitan_sp.attention.sharding import IGNORE_INDEX, shard_sequence
from torchtitan_sp.checkpoint_files import complete_checkpoints
from torchtitan_sp.config import Model, load_config, resolve_repo_path
from torchtitan_sp.data.tokenizer import PAT_STR, SHIPPED, SPECIAL_TOKENS, load_tokenizer, tokenizer_file
from torchtitan_sp.hf_checkpoint import expected_hf_shapes, load_hf_weights
from torchtitan_sp.models.hf import unpermute_rows
from torchtitan_sp.models.llama3 import ModelArgs, Transformer
from torchtitan_sp.rules import load_and_validate, validate

SEQ, BATCH, VOCAB = 64, 4, 2048  # batch: a sample per rank under dp 4 (HSDP 2 x 2)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=SEQ, rms_norm_eps=1e-5, bos_token_id=1792, eos_token_id=1793,
            rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
# 4 ranks: every strategy on dp2 x cp2 (usp as 2 x 2 on cp4), TP with FSDP, HSDP; tied embeddings under TP.
MESHES = {
    "dp2cp2-ring": ["--parallelism.context_parallel_degree", "2"],
    "dp2cp2-ulysses": ["--parallelism.context_parallel_degree", "2", "--parallelism.context_parallel_strategy",
                       "ulysses"],
    "dp2cp2-allgather": ["--parallelism.context_parallel_degree", "2", "--parallelism.context_parallel_strategy",
                         "allgather"],
    "cp4-usp": ["--parallelism.context_parallel_degree", "4", "--parallelism.context_parallel_strategy", "usp",
                "--parallelism.context_parallel_ulysses_degree", "2"],
    "dp2tp2": ["--parallelism.tensor_parallel_degree", "2"],
    "hsdp2x2": ["--parallelism.data_parallel_replicate_degree", "2"],
    "dp2tp2-tied": ["--parallelism.tensor_parallel_degree", "2"],
}
TRAIN = ["--training.steps", "3", "--lr_scheduler.warmup_steps", "0", "--optimizer.lr", "1e-3",
         "--checkpoint.last_save_in_hf", "true"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json as Llama 3's (transformers' tiktoken converter + a BOS template), tokenizer_config.json,
    and Meta's original/tokenizer.model."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter
    shipped = resolve_repo_path(SHIPPED)
    tok = TikTokenConverter(vocab_file=str(shipped), pattern=PAT_STR, extra_special_tokens=SPECIAL_TOKENS).converted()
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": SPECIAL_TOKENS[1], "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "original").mkdir()
    shutil.copy(shipped, folder / "original" / "tokenizer.model")


def make_hf_folder(folder: Path, tied: bool = False) -> Path:
    """A random LlamaForCausalLM saved as 6 safetensors shards + index, with the tokenizer files."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied))
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init: logits of O(1) that differ per token
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, max_shard_size="100KB")
    write_tokenizer(folder)
    return folder


def hf_args(folder: Path, dump: Path, *extra: str) -> list[str]:
    return ["--model.flavor", "hf", "--model.hf_assets_path", str(folder), "--checkpoint.initial_load_path",
            str(folder), "--checkpoint.initial_load_in_hf", "true", "--training.seq_len", str(SEQ),
            "--job.dump_folder", str(dump), "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
            "--debug.seed", "3", *extra]


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The untied and tied tiny models, and a batch with transformers' logits and loss on each."""
    root = tmp_path_factory.mktemp("hf")
    out = {"untied": make_hf_folder(root / "untied"), "tied": make_hf_folder(root / "tied", tied=True)}
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "positions": torch.arange(SEQ).expand(BATCH, SEQ)}
    for folder in list(out.values()):
        with torch.no_grad():
            logits = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)(batch["tokens"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        torch.save({**batch, "logits": logits, "loss": loss}, folder / "reference.pt")
    out["root"] = root
    return out


def _logits_and_loss(trainer, ref: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """This rank's logits (its data-parallel rank's samples, its cp shard of the sequence, full vocabulary)
    and the global mean loss."""
    from torch.distributed.tensor import DTensor

    from torchtitan_sp.loss import model_loss_sum
    b = trainer._shard({k: _dp_part(trainer, ref[k]) for k in ("tokens", "labels", "positions")})
    with torch.no_grad(), trainer._step_context():
        logits = trainer.model(b["tokens"], b["positions"])
        loss = model_loss_sum(trainer.model, b, False, ce=trainer.ce)
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    loss = (loss.full_tensor() if isinstance(loss, DTensor) else loss).reshape(1)
    dist.all_reduce(loss, group=trainer.meshes["dp_cp"].get_group())
    return logits, loss.item() / (ref["labels"] != IGNORE_INDEX).sum().item()


def _dp_part(trainer, x: torch.Tensor) -> torch.Tensor:
    """The samples of this rank's data-parallel rank (each holds batch / dp of them)."""
    dp, rank = trainer.dims.dp, trainer.meshes["dp"].get_local_rank()
    return x.chunk(dp)[rank]


def _check_logits(trainer, ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Relative errors of this rank's logits and of the loss against transformers'."""
    logits, loss = _logits_and_loss(trainer, ref)
    cp, want = trainer.dims.cp, _dp_part(trainer, ref["logits"])
    if cp > 1:
        want = shard_sequence(want, trainer.cp_rank, cp, trainer.cfg.parallelism.load_balance)
    return _rel(logits, want), abs(loss - ref["loss"].item()) / ref["loss"].item()


def _single_process(rank: int, world: int, folders: dict[str, Path]) -> dict:
    from torchtitan_sp.train import Trainer
    out: dict = {}
    root = folders["root"]
    for name in ("untied", "tied"):
        cfg = load_config(hf_args(folders[name], root / f"p1-{name}"))
        out[name] = _check_logits(Trainer(cfg, validate(cfg, world)), torch.load(folders[name] / "reference.pt"))
    # Train from the loaded weights; the export at the last step, and our logits of the trained model.
    cfg = load_config(hf_args(folders["untied"], root / "p1-train", *TRAIN))
    trainer = Trainer(cfg, validate(cfg, world))
    trainer.train()
    ref = torch.load(folders["untied"] / "reference.pt")
    # Tensors go through a file: the result queue's pipe holds little, and a tensor would cross in shared memory.
    torch.save(_logits_and_loss(trainer, ref)[0], root / "p1-trained-logits.pt")
    out["metrics"] = read_metrics(cfg.job.dump_folder)
    # The export loaded again: the same parameters, bit for bit.
    again = load_config(hf_args(root / "p1-train" / "checkpoint" / "step-3-hf", root / "p1-again"))
    reloaded = Trainer(again, validate(again, world)).model.state_dict()
    out["reload_exact"] = all(torch.equal(v.full_tensor(), reloaded[k].full_tensor())
                              for k, v in trainer.model.state_dict().items())
    return out


def _four_ranks(rank: int, world: int, folders: dict[str, Path], big: Path) -> dict:
    from torchtitan_sp.hf_checkpoint import export_hf
    from torchtitan_sp.train import Trainer
    root, out = folders["root"], {}
    for name, extra in MESHES.items():
        folder = folders["tied" if name.endswith("tied") else "untied"]
        cfg = load_config(hf_args(folder, root / f"p4-{name}", "--training.local_batch_size", "1", *extra))
        trainer = Trainer(cfg, validate(cfg, world))
        out[name] = _check_logits(trainer, torch.load(folder / "reference.pt"))
        if name in ("dp2tp2", "hsdp2x2"):  # load -> export: the source files, bit for bit
            export_hf(trainer.model, trainer.model_args, cfg, root / f"p4-{name}" / "roundtrip")
    cfg = load_config(hf_args(folders["untied"], root / "p4-train", *TRAIN, *MESHES["dp2cp2-ring"],
                              "--training.local_batch_size", "1", "--checkpoint.export_dtype", "bfloat16"))
    Trainer(cfg, validate(cfg, world)).train()
    dist.barrier()
    out["metrics"] = read_metrics(cfg.job.dump_folder) if rank == 0 else None
    out["memory"] = _load_memory(world, big, root / "p4-big")
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _load_memory(world: int, folder: Path, dump: Path) -> dict:
    """Peak resident memory added by loading the big bf16 model into the initialized (resident) model."""
    from torchtitan_sp.train import Trainer
    cfg = load_config(["--model.flavor", "hf", "--model.hf_assets_path", str(folder), "--training.seq_len", "64",
                       "--job.dump_folder", str(dump), "--metrics.enable_tensorboard", "false"])
    trainer = Trainer(cfg, validate(cfg, world))
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    before = _status_kib("VmRSS")
    load_hf_weights(trainer.model, folder, trainer.model_args)
    grown = _status_kib("VmHWM") - before
    wk = trainer.model.state_dict()["layers.0.attention.wk.weight"].full_tensor()
    emb = trainer.model.state_dict()["tok_embeddings.weight"].full_tensor()
    dump.mkdir(parents=True, exist_ok=True)
    torch.save(wk, dump / f"wk-{dist.get_rank()}.pt")
    return {"grown_bytes": grown * 1024, "emb_sum": emb.double().sum().item()}


def make_big_folder(folder: Path) -> tuple[Path, int]:
    """A Llama of ~70M parameters (285 MB in fp32) in bf16 safetensors, in 2 files; config.json alone."""
    args = ModelArgs(dim=1024, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=2816,
                     rope_scaling="none", max_position_embeddings=SEQ)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ, rms_norm_eps=1e-5)
    folder.mkdir()
    config.to_json_file(folder / "config.json")
    gen = torch.Generator().manual_seed(0)
    shapes = expected_hf_shapes(args)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    keys = list(tensors)
    save_file({k: tensors[k] for k in keys[:len(keys) // 2]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in keys[len(keys) // 2:]}, folder / "model-00002-of-00002.safetensors")
    fp32_bytes = sum(t.numel() for t in tensors.values()) * 4
    return folder, fp32_bytes


def test_hf_weights_on_one_process_and_four_ranks(folders: dict[str, Path]) -> None:
    root = folders["root"]
    one = run_distributed(_single_process, 1, folders)[0]
    for name in ("untied", "tied"):
        assert one[name][0] < 1e-5 and one[name][1] < 1e-5, (name, one[name])

    # The export at the last step: transformers loads it and computes the trainer's logits.
    export = root / "p1-train" / "checkpoint" / "step-3-hf"
    assert sorted(complete_checkpoints(export.parent)) == []  # resume never takes a -hf folder
    files = sorted(p.name for p in export.iterdir())
    assert files == ["config.json", "generation_config.json", "model-00001-of-00001.safetensors",
                     "model.safetensors.index.json", "original", "tokenizer.json", "tokenizer_config.json"], files
    config = json.loads((export / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["torch_dtype"] == "float32"
    ref = torch.load(folders["untied"] / "reference.pt")
    with torch.no_grad():
        hf = LlamaForCausalLM.from_pretrained(export)(ref["tokens"]).logits
    assert _rel(hf, torch.load(root / "p1-trained-logits.pt")) < 1e-5
    assert _rel(hf, ref["logits"]) > 1e-3  # training moved the weights
    assert one["reload_exact"]

    big, fp32_bytes = make_big_folder(root / "big")
    four = run_distributed(_four_ranks, 4, folders, big)
    for name in MESHES:
        for rank, result in enumerate(four):
            assert result[name][0] < 1e-5 and result[name][1] < 1e-5, (name, rank, result[name])
    source = hf_tensors(folders["untied"])
    for name in ("dp2tp2", "hsdp2x2"):
        exported = hf_tensors(root / f"p4-{name}" / "roundtrip")
        assert sorted(exported) == sorted(source)
        assert all(torch.equal(exported[k], source[k]) for k in source), name

    # Training from the loaded weights: dp2 x cp2 logs what 1 process logs; its bf16 export holds its weights.
    got, want = four[0]["metrics"], one["metrics"]
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(got, want):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (got, want)
    bf16 = hf_tensors(root / "p4-train" / "checkpoint" / "step-3-hf")
    fp32 = hf_tensors(export)
    assert all(bf16[k].dtype == torch.bfloat16 for k in bf16)
    assert all(torch.allclose(bf16[k].float(), fp32[k], rtol=1e-2, atol=1e-4) for k in fp32)

    # Memory: each rank added well under half the fp32 model while loading it (bf16 file -> fp32 shards).
    file = hf_tensors(big)
    for rank, result in enumerate(four):
        mem = result["memory"]
        assert mem["grown_bytes"] < fp32_bytes / 2, (mem["grown_bytes"], fp32_bytes)
        wk = unpermute_rows(file["model.layers.0.self_attn.k_proj.weight"].float(), 2)
        assert torch.equal(torch.load(root / "p4-big" / f"wk-{rank}.pt"), wk)
        assert mem["emb_sum"] == file["model.embed_tokens.weight"].double().sum().item()


def test_tokenizer_ids_equal_autotokenizer(folders: dict[str, Path]) -> None:
    """tokenizer.json (what an HF folder resolves to) and original/tokenizer.model give AutoTokenizer's ids."""
    folder = folders["untied"]
    assert tokenizer_file(Model(hf_assets_path=str(folder))) == folder / "tokenizer.json"
    assert tokenizer_file(Model(hf_assets_path=str(folder), tokenizer_path=str(folder / "original/tokenizer.model"))) \
        == folder / "original/tokenizer.model"
    hf = AutoTokenizer.from_pretrained(folder)
    chat = "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
    for name in ("tokenizer.json", "original/tokenizer.model"):
        ours = load_tokenizer(folder / name)
        assert (ours.n_words, ours.bos_id, ours.eos_id) == (len(hf), hf.bos_token_id, hf.eos_token_id)
        assert all(hf.convert_tokens_to_ids(tok) == i for tok, i in ours.special_tokens.items())
        for text in MIXED:  # special-token strings in data stay text in ours: split_special_tokens in HF's
            assert ours.encode(text, bos=True, eos=False) == hf(text, split_special_tokens=True)["input_ids"], text
            assert ours.decode(ours.encode(text, bos=False, eos=False)) == text
        specials = ours.special_tokens
        pieces = [specials["<|start_header_id|>"], *ours.encode("user", False, False), specials["<|end_header_id|>"],
                  *ours.encode("\n\nHello there", False, False), specials["<|eot_id|>"]]
        assert hf(chat, add_special_tokens=False)["input_ids"] == pieces


def _write_set(folder: Path, shapes: dict[str, list[int]]) -> Path:
    folder.mkdir()
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, folder / "model.safetensors")
    return folder


def _bad_inputs(folder: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=160)
    shapes = expected_hf_shapes(args)
    q = "model.layers.1.self_attn.q_proj.weight"
    small_vocab = tmp / "small_vocab"
    shutil.copytree(folder, small_vocab)
    config = json.loads((small_vocab / "config.json").read_text())
    (small_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": 1024}))
    debug = {k: v for k, v in Transformer(ModelArgs(dim=128, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=2048,
                                                    multiple_of=64, ffn_dim_multiplier=None)).state_dict().items()}
    torch.save(debug, tmp / "one_layer.pt")
    torch.save({**debug, "extra.weight": torch.zeros(1)}, tmp / "extra.pt")
    no_tokenizer = tmp / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(folder / "config.json", no_tokenizer / "config.json")
    (tmp / "bad.json").write_text("{}")
    load = ["--model.flavor", "hf", "--model.hf_assets_path", str(folder), "--checkpoint.initial_load_in_hf", "true",
            "--checkpoint.initial_load_path"]
    return {
        "in_hf without a path": (["--checkpoint.initial_load_in_hf", "true"],
                                 "checkpoint.initial_load_in_hf: needs checkpoint.initial_load_path"),
        "export_dtype without export": (["--checkpoint.export_dtype", "bfloat16"],
                                        "checkpoint.export_dtype: 'bfloat16' has no effect without "
                                        "checkpoint.last_save_in_hf = true"),
        "safetensors without in_hf": (["--model.flavor", "hf", "--model.hf_assets_path", str(folder),
                                       "--checkpoint.initial_load_path", str(folder)],
                                      f"checkpoint.initial_load_path: {folder} holds safetensors"),
        "no safetensors": ([*load, str(tmp)], f"checkpoint.initial_load_path: {tmp} has no \\*.safetensors"),
        "missing key": ([*load, str(_write_set(tmp / "missing", {k: s for k, s in shapes.items() if k != q}))],
                        f"has no {q} \\(\\[64, 64\\] in model.flavor 'hf'"),
        "other shape": ([*load, str(_write_set(tmp / "shape", {**shapes, q: [32, 64]}))],
                        f"{q} is \\[32, 64\\] there, \\[64, 64\\] in model.flavor 'hf'"),
        "unexpected key": ([*load, str(_write_set(tmp / "extra", {**shapes, "model.layers.2.mlp.up_proj.weight": [4]}))
                            ],
                           "unexpected key model.layers.2.mlp.up_proj.weight \\(1 in all\\)"),
        "tokenizer beyond vocab": (["--model.flavor", "hf", "--model.hf_assets_path", str(small_vocab),
                                    "--training.dataset", "stdlib"],
                                   f"model.tokenizer_path: {small_vocab}/tokenizer.json has 2048 tokens, more than "
                                   "the model's vocab_size 1024"),
        "no tokenizer in the folder": (["--model.flavor", "hf", "--model.hf_assets_path", str(no_tokenizer),
                                        "--training.dataset", "stdlib"],
                                       f"model.hf_assets_path: {no_tokenizer} has neither tokenizer.json nor "
                                       "original/tokenizer.model; set model.tokenizer_path"),
        "bad tokenizer.json": (["--model.tokenizer_path", str(tmp / "bad.json"), "--training.dataset", "stdlib"],
                               f"model.tokenizer_path: cannot read {tmp}/bad.json as a tokenizer.json: "),
        "model.pt of another shape": (["--checkpoint.initial_load_path", str(tmp / "one_layer.pt")],
                                      "one_layer.pt holds another model than model.flavor 'debug': "
                                      "layers.1.attention.wq.weight is absent there, \\[128, 128\\] here"),
        "model.pt with extra keys": (["--checkpoint.initial_load_path", str(tmp / "extra.pt"), "--model.n_layers", "1"],
                                     "extra.pt holds another model than model.flavor 'debug' with model.n_layers 1: "
                                     "extra.weight is \\[1\\] there, absent here"),
    }


def test_bad_input_is_one_line_before_launch(folders: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    for name, (argv, message) in _bad_inputs(folders["untied"], tmp_path).items():
        with pytest.raises(SystemExit) as exit_:
            load_and_validate(["--job.dump_folder", str(tmp_path / "dump"), *argv], world_size=1)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, name
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert re.search(message, err), (name, err)
    assert not (tmp_path / "dump").exists()
    # seq_len past max_position_embeddings with the RoPE unchanged is allowed (extension is the point).
    load_and_validate(hf_args(folders["untied"], tmp_path / "dump", "--training.seq_len", "128"), world_size=1)


def test_export_config_carries_the_run(folders: dict[str, Path]) -> None:
    """config.json of an export: the source's token ids, this run's RoPE, max_position_embeddings raised to
    the trained seq_len, the export dtype; transformers reads it as the same RoPE."""
    from torchtitan_sp.hf_checkpoint import export_config
    from torchtitan_sp.models.shape import model_args
    cfg = load_config(hf_args(folders["untied"], folders["root"] / "cfg", "--training.seq_len", "256",
                              "--model.rope_theta", "1000000", "--model.rope_factor", "16"))
    config = export_config(cfg, model_args(cfg.model), "bfloat16")
    assert (config["max_position_embeddings"], config["bos_token_id"], config["torch_dtype"]) == (256, 1792, "bfloat16")
    assert config["rope_theta"] == 1e6 and config["rope_scaling"]["factor"] == 16
    rope = LlamaConfig(**config).rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"], rope["original_max_position_embeddings"]) == \
        ("llama3", 16, 1e6, 16)
