"""Data sources: weighted mixtures (proportions, independent streams, exact resume, per-source
token counts), pre-tokenized input (.jsonl input_ids/labels, .npy), the data keys a dataset would
ignore, and the start-up summary of the data."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_chat import qa, train_here, write_chats
from tests.test_train import assert_close, losses
from tests.trainer_utils import resumed_loader_matches, tiny_args
from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.config import ConfigError, load_config
from torchtitan_sp.data import text
from torchtitan_sp.data.sources import (
    MixtureDataset,
    build_dataset,
    check_data_config,
    mixture_resume_after,
    parse_sources,
)
from torchtitan_sp.data.summary import describe_data
from torchtitan_sp.rules import load_and_validate

REPO = Path(__file__).resolve().parent.parent


def config(*args: str):
    return load_config(["--config", "", *args])


def write_words(path: Path, word: str, n: int) -> Path:
    """n documents made of one word: a window's source is readable from its tokens."""
    path.write_text("".join(json.dumps({"text": f"{word} " * (2 + i % 5)}) + "\n" for i in range(n)))
    return path


def mixture(tmp_path: Path, spec: str, *args: str):
    for word in ("alpha", "beta", "gamma"):
        (tmp_path / word).mkdir(exist_ok=True)
        write_words(tmp_path / word / "d.jsonl", word, 30)
    return config("--training.dataset", "files", "--training.dataset_path", spec.format(tmp=tmp_path),
                  "--training.seq_len", "16", *args)


def source_of(ds: MixtureDataset, sample: dict[str, torch.Tensor]) -> str:
    words = set(ds.streams[0].tokenizer.decode(sample["tokens"].tolist()).split()) & {"alpha", "beta", "gamma"}
    assert len(words) == 1, words  # a window comes from one source
    return words.pop()


def test_mixture_proportions_and_independent_streams(tmp_path: Path) -> None:
    cfg = mixture(tmp_path, "{tmp}/alpha/*.jsonl:5,{tmp}/beta:3,{tmp}/gamma/d.jsonl:2")
    ds = build_dataset(cfg, 0, 1)
    assert isinstance(ds, MixtureDataset) and [s.weight for s in ds.sources] == [0.5, 0.3, 0.2]
    it = iter(ds)
    samples = [next(it) for _ in range(2000)]
    names = [source_of(ds, s) for s in samples]
    for word, weight in (("alpha", 0.5), ("beta", 0.3), ("gamma", 0.2)):
        assert abs(names.count(word) / 2000 - weight) <= 0.02
        assert abs(names[:100].count(word) / 100 - weight) <= 0.02  # the deficit sampler keeps short runs close too
    assert names[:40] != sorted(names[:40]) and len(set(names[:10])) == 3  # interleaved at random
    # Each source is its own stream: alpha's windows are those of alpha read alone (seed + 0).
    alone = iter(build_dataset(config("--training.dataset", "files", "--training.dataset_path",
                                      str(tmp_path / "alpha"), "--training.seq_len", "16"), 0, 1))
    for sample in [s for s, n in zip(samples, names) if n == "alpha"][:300]:  # several epochs of alpha
        assert torch.equal(sample["tokens"], next(alone)["tokens"])
    assert ds.tokens == [sum(int((s["labels"] != IGNORE_INDEX).sum()) for s, n in zip(samples, names) if n == w)
                         for w in ("alpha", "beta", "gamma")]
    other_seed = iter(build_dataset(mixture(tmp_path, "{tmp}/alpha:5,{tmp}/beta:3,{tmp}/gamma:2",
                                            "--debug.seed", "1"), 0, 1))
    assert [source_of(ds, next(other_seed)) for _ in range(40)] != names[:40]


def test_mixture_loader_resume_is_exact(tmp_path: Path) -> None:
    cfg = mixture(tmp_path, "{tmp}/alpha:0.6,{tmp}/beta:0.4", "--training.local_batch_size", "2")
    loader, resumed, _ = resumed_loader_matches(cfg, skip=7, count=30)
    assert resumed.dataset.state_dict() == loader.dataset.state_dict()


def test_mixture_training_resume_reproduces_losses_and_counts_tokens(tmp_path: Path, monkeypatch) -> None:
    """Stopped at step 3 (checkpoint) and resumed to 6: the losses of the uninterrupted run, and
    metrics.jsonl's per-source token counts, which add up to tokens_seen."""
    for word in ("alpha", "beta"):
        (tmp_path / word).mkdir()
        write_words(tmp_path / word / "d.jsonl", word, 40)
    data = ["--training.dataset", "files", "--training.dataset_path", f"{tmp_path}/alpha:0.7,{tmp_path}/beta:0.3",
            "--training.steps", "6", "--lr_scheduler.decay_type", "none",  # the schedule must not depend on steps
            "--lr_scheduler.min_lr_factor", "0"]
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "3"]
    whole, first, resumed = train_here(monkeypatch, [tiny_args(tmp_path / "whole", *data),
                                                     tiny_args(tmp_path / "cut", *data, *ckpt, "--training.steps", "3"),
                                                     tiny_args(tmp_path / "cut", *data, *ckpt)])
    assert [m["step"] for m in first] == [1, 2, 3] and [m["step"] for m in resumed] == list(range(1, 7))
    assert_close(losses(resumed), losses(whole), 1e-6)
    for m in whole:
        assert m["tokens_source0"] + m["tokens_source1"] == m["tokens_seen"]
    assert whole[-1]["tokens_source1"] > 0
    assert [(m["tokens_source0"], m["tokens_source1"]) for m in resumed[3:]] == \
        [(m["tokens_source0"], m["tokens_source1"]) for m in whole[3:]]


@pytest.mark.parametrize("value, message", [
    ("a.jsonl:0.6,b.jsonl:abc", "the weight 'abc' of b.jsonl is not a number"),
    ("a.jsonl:0.6,b.jsonl:0", "the weight of b.jsonl must be a positive number, got 0"),
    ("a.jsonl:-1,b.jsonl:1", "the weight of a.jsonl must be a positive number, got -1"),
    ("a.jsonl:nan,b.jsonl:1", "the weight of a.jsonl must be a positive number, got nan"),
    ("a.jsonl:0.6,b.jsonl", "'b.jsonl' is not PATH:WEIGHT"),
    ("a.jsonl:0.5,:0.5", "':0.5' is not PATH:WEIGHT"),
])
def test_bad_weights(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="training.dataset_path: " + message.replace("(", "\\(")):
        parse_sources(value)


def test_pre_tokenized_jsonl_and_npy(tmp_path: Path, monkeypatch) -> None:
    """input_ids are used as stored (no BOS/EOS added), labels -100 mask targets; a 1-D .npy is a
    token stream (documents of NPY_PIECE_TOKENS), a 2-D one has a document per row."""
    (tmp_path / "t.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}) + "\n"
                                      + json.dumps({"input_ids": [9, 10, 11]}) + "\n")
    ds = build_dataset(config("--training.dataset", "files", "--training.dataset_path", str(tmp_path / "t.jsonl"),
                              "--training.seq_len", "6"), 0, 1)
    s = next(iter(ds))
    assert s["tokens"].tolist() == [5, 6, 7, 8, 9, 10]
    assert s["labels"].tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, 11]
    assert s["document_ids"].tolist() == [0, 0, 0, 0, 1, 1] and s["positions"].tolist() == [0, 1, 2, 3, 0, 1]
    np.save(tmp_path / "one.npy", np.arange(1, 10, dtype=np.uint16))
    np.save(tmp_path / "rows.npy", np.array([[20, 21, 22], [23, 24, 25]], dtype=np.int32))
    for name, tokens in (("one.npy", list(range(1, 7))), ("rows.npy", [20, 21, 22, 23, 24, 25])):
        cfg = config("--training.dataset", "files", "--training.dataset_path", str(tmp_path / name),
                     "--training.seq_len", "6")
        check_data_config(cfg)
        assert next(iter(build_dataset(cfg, 0, 1)))["tokens"].tolist() == tokens
    np.save(tmp_path / "big.npy", np.array([1, 2, 5000]))
    with pytest.raises(ValueError,
                       match=r"big.npy piece 0: token id 5000 is outside the model's vocabulary \[0, 2048\)"):
        check_data_config(config("--training.dataset", "files", "--training.dataset_path", str(tmp_path / "big.npy")))
    monkeypatch.setattr(text, "NPY_PIECE_TOKENS", 4)
    s = next(iter(build_dataset(config("--training.dataset", "files", "--training.dataset_path",
                                       str(tmp_path / "one.npy"), "--training.seq_len", "6"), 0, 1)))
    assert s["document_ids"].tolist() == [0, 0, 0, 0, 1, 1] and s["positions"].tolist() == [0, 1, 2, 3, 0, 1]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": qa("q", "a")}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl line 1: a chat record .* set training.dataset = 'chat'"):
        check_data_config(config("--training.dataset", "files", "--training.dataset_path",
                                 str(tmp_path / "chat.jsonl")))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_ids": [1, 2], "labels": [1, 3]}) + "\n")
    with pytest.raises(ValueError, match='bad.jsonl line 1: "labels" must have one entry per input id'):
        check_data_config(config("--training.dataset", "files", "--training.dataset_path", str(tmp_path / "bad.jsonl")))


def test_pre_tokenized_chat_keeps_its_labels(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}) + "\n")
    s = next(iter(build_dataset(config("--training.dataset", "chat", "--training.dataset_path", str(path),
                                       "--training.seq_len", "8"), 0, 1)))
    assert s["tokens"][:4].tolist() == [1, 2, 3, 4] and s["labels"][:4].tolist() == [IGNORE_INDEX, 3, 4, IGNORE_INDEX]


IGNORED_KEYS = {  # arguments -> the message
    "path with synthetic": (["--training.dataset_path", "x.jsonl"],
                            "training.dataset_path: set .* but training.dataset = 'synthetic'"),
    "path with stdlib": (["--training.dataset", "stdlib", "--training.dataset_path", "x.jsonl"],
                         "training.dataset_path: set .* but training.dataset = 'stdlib'"),
    "packing with synthetic": (["--training.packing", "false"], "training.packing: synthetic samples"),
    "train_on_prompt with files": (["--training.dataset", "stdlib", "--training.train_on_prompt", "true"],
                                   "training.train_on_prompt: applies to training.dataset = 'chat' only"),
    "truncation with synthetic": (["--training.truncation", "right"],
                                  "training.truncation: applies to training.dataset = 'chat' only"),
    "chat without a path": (["--training.dataset", "chat"], "training.dataset_path: required"),
}


@pytest.mark.parametrize("case", IGNORED_KEYS)
def test_keys_the_dataset_would_ignore_are_errors(case: str) -> None:
    args, message = IGNORED_KEYS[case]
    with pytest.raises(ConfigError, match=message):
        check_data_config(config(*args))


def test_validate_exits_2_naming_both_keys(tmp_path: Path, capsys) -> None:
    """What run_train.sh runs before launch (python -m torchtitan_sp.validate), here in-process."""
    with pytest.raises(SystemExit) as exit_:
        load_and_validate(["--config", "", "--training.dataset_path", str(tmp_path)], world_size=1)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: training.dataset_path = ") and "without training.dataset = 'files' or 'chat'" in err


def test_start_up_summary_names_the_data(tmp_path: Path) -> None:
    cfg = mixture(tmp_path, "{tmp}/alpha:0.75,{tmp}/beta:0.25")
    lines = describe_data(cfg, build_dataset(cfg, 0, 1), run_tokens=16 * 2 * 200)
    text = "\n".join(line for _, line in lines)
    assert "training.dataset files, 2 source(s); tokenizer" in text and "documents packed into windows" in text
    assert f"data source 0: {tmp_path}/alpha (weight 0.75): 1 files" in text and "30 documents" in text
    epochs = [float(line.split("about ")[2].split(" epochs")[0]) for _, line in lines[1:]]
    assert epochs[0] > 1 and epochs[1] < epochs[0]
    assert [level for level, _ in lines[1:]][0] == logging.WARNING and "wraps around" in lines[1][1]
    chat = write_chats(tmp_path / "c.jsonl", [qa("q", "a")] * 4)
    cfg = config("--training.dataset", "chat", "--training.dataset_path", str(chat), "--training.seq_len", "256")
    text = "\n".join(line for _, line in describe_data(cfg, build_dataset(cfg, 0, 1), run_tokens=256))
    assert "labels on assistant replies only" in text and "conversations longer than seq_len 256: drop" in text


def test_mixture_resumes_on_another_dp_degree_without_repeats(tmp_path: Path) -> None:
    """Old dp 2 -> new dp 3 (what the checkpoint does with mixture_resume_after): each source goes
    on after the furthest document an old rank used of it; none is read twice; token counts carry."""
    for word in ("alpha", "beta"):
        (tmp_path / word).mkdir()
        records = (json.dumps({"text": f"{word}-{i:03d} " + "x " * (i % 9)}) + "\n" for i in range(200))
        (tmp_path / word / "d.jsonl").write_text("".join(records))
    cfg = config("--training.dataset", "files",
                 "--training.dataset_path", f"{tmp_path}/alpha:0.5,{tmp_path}/beta:0.5",
                 "--training.seq_len", "32")

    def names(ds: MixtureDataset, n: int) -> set[str]:
        it, tok = iter(ds), ds.streams[0].tokenizer
        return {m for _ in range(n)
                for m in re.findall(r"(?:alpha|beta)-\d{3}", tok.decode(next(it)["tokens"].tolist()))}

    old = [build_dataset(cfg, r, 2) for r in range(2)]
    used = names(old[0], 4) | names(old[1], 20)  # ranks at different places: the furthest one counts
    states = [ds.state_dict() for ds in old]
    new = [build_dataset(cfg, r, 3) for r in range(3)]
    for r, ds in enumerate(new):
        ds.load_state_dict(mixture_resume_after(states, r))
    assert sum(ds.tokens[0] + ds.tokens[1] for ds in new) == sum(ds.tokens[0] + ds.tokens[1] for ds in old)
    read = set().union(*(names(ds, 12) for ds in new))
    assert used and read and not used & read, sorted(used & read)
    assert {n.split("-")[0] for n in read} == {"alpha", "beta"}
