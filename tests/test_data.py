"""Real-text data: packing layout, padding, CP sharding coverage, dp sharding, epoch order,
exact resume through StatefulDataLoader, file formats, and the one-line errors for bad input."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.trainer_utils import resumed_loader_matches
from torchtitan_sp.attention.sharding import IGNORE_INDEX, shard_indices, shard_sequence
from torchtitan_sp.config import Config, load_config
from torchtitan_sp.data import build_dataloader
from torchtitan_sp.data.packing import Packer
from torchtitan_sp.data.sources import check_data_config
from torchtitan_sp.data.text import (
    Cursor,
    TextDataset,
    build_text_dataset,
    check_tokenizer_vocab,
    resolve_files,
    resume_after,
    stdlib_files,
)

KEYS = ("tokens", "labels", "positions", "document_ids")


def config(*args: str) -> Config:
    return load_config(["--config", "", *args])  # dataclass defaults, independent of the recipes


def files_config(path: Path | str, *args: str) -> Config:
    return config("--training.dataset", "files", "--training.dataset_path", str(path), *args)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def doc_texts(n: int) -> list[str]:
    """Documents of varied length whose first line names them."""
    return [f"doc-{i:03d}\n" + "lorem ipsum dolor sit amet, " * (1 + i % 7) for i in range(n)]


def take(ds: TextDataset, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def doc_name(ds: TextDataset, sample: dict[str, torch.Tensor]) -> str:
    return ds.tokenizer.decode(sample["tokens"][1:12].tolist()).split("\n")[0]


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in KEYS:
            assert torch.equal(x[k], y[k]), k


def test_stdlib_files() -> None:
    files = stdlib_files()
    assert len(files) > 300 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not [f for f in files if {"test", "tests", "site-packages"} & set(f.parts)]
    assert any(f.name == "os.py" for f in files)


def test_packer_layout() -> None:
    """Stream 1..10 in documents [1 2 3] [4 5] [6 .. 10]; windows of 4 + 1 overlap by one token."""
    packer = Packer(4)
    for key, doc in (("a", [1, 2, 3]), ("b", [4, 5]), ("c", [6, 7, 8, 9, 10])):
        packer.add(key, doc)
    assert packer.full()
    first = packer.pop()
    assert first["tokens"].tolist() == [1, 2, 3, 4]
    assert first["labels"].tolist() == [2, 3, IGNORE_INDEX, 5]  # 3 -> 4 crosses into another document
    assert first["positions"].tolist() == [0, 1, 2, 0]
    assert first["document_ids"].tolist() == [0, 0, 0, 1]
    assert (packer.head, packer.offset) == ("b", 1)  # the next window starts at token 5
    second = packer.pop()
    assert second["tokens"].tolist() == [5, 6, 7, 8]
    assert second["labels"].tolist() == [IGNORE_INDEX, 7, 8, 9]
    assert second["positions"].tolist() == [0, 0, 1, 2]
    assert second["document_ids"].tolist() == [0, 1, 1, 1]
    assert (packer.head, packer.offset, packer.full()) == ("c", 3, False)
    for s in (first, second):
        assert all(s[k].dtype == torch.long and s[k].shape == (4,) for k in KEYS)


def test_packed_stream_matches_documents(tmp_path: Path) -> None:
    texts = doc_texts(12)
    texts[3], texts[7] = "", "   \n"  # empty documents are skipped
    ds = build_text_dataset(files_config(write_jsonl(tmp_path / "d.jsonl", texts), "--training.seq_len", "32"), 0, 1)
    tok = ds.tokenizer
    stream = [i for t in texts if t.strip() for i in tok.encode(t, bos=True, eos=True)]
    n = (len(stream) - 1) // 32
    for k, s in enumerate(take(ds, n)):
        window = torch.tensor(stream[k * 32:(k + 1) * 32 + 1])
        assert torch.equal(s["tokens"], window[:-1])
        nxt = window[1:]
        assert torch.equal(s["labels"], torch.where(nxt == tok.bos_id, IGNORE_INDEX, nxt))
        starts = (s["tokens"] == tok.bos_id) & (torch.arange(32) > 0)  # a new document begins at each BOS
        assert torch.equal(s["document_ids"], torch.cumsum(starts.long(), 0))
        last_start = torch.cummax(torch.where(starts, torch.arange(32), 0), 0).values
        assert torch.equal(s["positions"], torch.arange(32) - last_start)


def test_padded_samples(tmp_path: Path) -> None:
    texts = ["hi", "a longer document " * 20]
    ds = build_text_dataset(files_config(write_jsonl(tmp_path / "d.jsonl", texts), "--training.seq_len", "16",
                                         "--training.packing", "false"), 0, 1)
    short, long = take(ds, 2)
    ids = ds.tokenizer.encode("hi", bos=True, eos=True)
    n = len(ids) - 1
    assert short["tokens"].tolist() == ids[:-1] + [ds.tokenizer.pad_id] * (16 - n)
    assert short["labels"].tolist() == ids[1:] + [IGNORE_INDEX] * (16 - n)
    assert short["document_ids"].tolist() == [0] * n + [1] * (16 - n)
    assert short["positions"].tolist() == list(range(16))
    ids = ds.tokenizer.encode(texts[1], bos=True, eos=True)
    assert long["tokens"].tolist() == ids[:16] and long["labels"].tolist() == ids[1:17]
    assert long["document_ids"].tolist() == [0] * 16


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_shards_hold_each_label_once(tmp_path: Path, cp: int) -> None:
    """Head-tail sharding of a packed batch: every (token, label, position, document) exactly once."""
    cfg = files_config(write_jsonl(tmp_path / "d.jsonl", doc_texts(30)), "--training.seq_len", "64")
    batch = next(iter(build_dataloader(cfg, 2048, 0, 1)))
    assert (batch["document_ids"].amax(dim=1) > 0).all()  # windows that hold document boundaries
    full = torch.stack([batch[k] for k in KEYS], dim=-1)  # (B, S, 4)
    seen: Counter[int] = Counter()
    for r in range(cp):
        idx = shard_indices(64, r, cp, headtail=True)
        part = torch.stack([shard_sequence(batch[k], r, cp, headtail=True) for k in KEYS], dim=-1)
        assert torch.equal(part, full[:, idx])
        seen.update(idx.tolist())
    assert seen == Counter(range(64))


def test_dp_ranks_disjoint_cp_ranks_identical(tmp_path: Path) -> None:
    cfg = files_config(write_jsonl(tmp_path / "d.jsonl", doc_texts(40)), "--training.seq_len", "32",
                       "--training.packing", "false")
    names = []
    for rank in range(2):
        ds = build_text_dataset(cfg, rank, 2)
        names.append([doc_name(ds, s) for s in take(ds, 20)])  # one epoch of this rank
        assert_same(take(build_text_dataset(cfg, rank, 2), 20), take(build_text_dataset(cfg, rank, 2), 20))
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == [f"doc-{i:03d}" for i in range(40)]


def test_stdlib_dp_ranks_read_disjoint_files() -> None:
    cfg = config("--training.dataset", "stdlib", "--training.seq_len", "64")
    files = []
    for rank in range(2):
        ds = build_text_dataset(cfg, rank, 2)
        docs = ds.corpus.documents(Cursor(0, 0, 0, 0))
        cursors = [next(docs)[0] for _ in range(6)]
        assert all(c.doc % 2 == rank for c in cursors)
        files.append({ds.corpus.order(0)[c.file] for c in cursors})
        assert_same(take(ds, 2), take(build_text_dataset(cfg, rank, 2), 2))
    assert not files[0] & files[1]


def test_epochs_reshuffle_by_seed(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}\n")
    orders = {}
    for seed in (0, 0, 1):
        ds = build_text_dataset(files_config(tmp_path, "--debug.seed", str(seed)), 0, 1)
        docs = ds.corpus.documents(Cursor(0, 0, 0, 0))
        order = [next(docs)[1] for _ in range(16)]
        assert sorted(order[:8]) == sorted(order[8:]) == [f"file {i}\n" for i in range(8)]
        assert order[:8] != order[8:]  # each epoch has its own order
        assert orders.setdefault(seed, order) == order  # the same seed gives the same stream
    assert orders[0] != orders[1]


RESUME_CASES = {
    "stdlib-packed": ("--training.dataset", "stdlib", "--training.seq_len", "64"),
    "stdlib-padded": ("--training.dataset", "stdlib", "--training.seq_len", "64", "--training.packing", "false"),
    "files-packed-epochs": ("--training.seq_len", "16"),
    "files-padded-epochs": ("--training.seq_len", "16", "--training.packing", "false"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
@pytest.mark.parametrize("dp_rank, dp_size", [(0, 1), (1, 2)])
def test_resume_is_exact(tmp_path: Path, case: str, dp_rank: int, dp_size: int) -> None:
    args = RESUME_CASES[case]
    if case.startswith("files"):  # a tiny three-file corpus, so the 6 batches after the resume cross epochs
        for i in range(3):
            write_jsonl(tmp_path / f"part{i}.jsonl", [f"part {i} doc {j}" + " word" * j for j in range(3)])
        args = ("--training.dataset", "files", "--training.dataset_path", str(tmp_path / "*.jsonl"), *args)
    cfg = config(*args, "--training.local_batch_size", "2", "--debug.seed", "3")
    loader, resumed, saved = resumed_loader_matches(cfg, skip=3, count=6, dp_rank=dp_rank, dp_size=dp_size)
    if case.startswith("files"):  # the 6 batches after the resume crossed into the next epoch
        assert loader.dataset.cursor.epoch > saved["dataset_state"]["epoch"]
    assert resumed.state_dict()["dataset_state"] == loader.state_dict()["dataset_state"]


def test_resume_after_cursor_rules() -> None:
    def st(epoch: int, doc: int, offset: int) -> dict[str, int]:
        return {"epoch": epoch, "file": 0, "item": doc, "doc": doc, "offset": offset}
    # The furthest cursor wins (epoch first); a document partly used by its owner is skipped.
    assert resume_after([st(0, 10, 5), st(0, 7, 0)]) == st(0, 11, 0)
    assert resume_after([st(0, 10, 0), st(0, 7, 3)]) == st(0, 10, 0)
    assert resume_after([st(0, 50, 0), st(1, 2, 0)]) == st(1, 2, 0)


@pytest.mark.parametrize("packing", ["true", "false"])
def test_resume_on_another_dp_degree_repeats_no_document(tmp_path: Path, packing: str) -> None:
    """Old dp 2 -> new dp 3: the new ranks start after the furthest document an old rank used, so
    no document is trained on twice, and few are skipped."""
    cfg = files_config(write_jsonl(tmp_path / "docs.jsonl", doc_texts(80)), "--training.seq_len", "32",
                       "--training.packing", packing)

    def names(ds: TextDataset, samples: list[dict[str, torch.Tensor]]) -> set[int]:
        return {int(m) for s in samples for m in re.findall(r"doc-(\d{3})", ds.tokenizer.decode(s["tokens"].tolist()))}

    old = [build_text_dataset(cfg, r, 2) for r in range(2)]
    used = set().union(*(names(ds, take(ds, 5)) for ds in old))
    states = [ds.state_dict() for ds in old]
    new = [build_text_dataset(cfg, r, 3) for r in range(3)]
    for ds in new:
        ds.load_state_dict(resume_after(states))
    read = set().union(*(names(ds, take(ds, 5)) for ds in new))
    assert used and read and not used & read, (sorted(used), sorted(read))
    skipped = set(range(min(read))) - used
    assert len(skipped) <= 3, sorted(skipped)


def test_json_array_and_txt_folder(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"text": "first"}, {"text": ""}, {"text": "second"}]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("whole\n\nfile, one document\n")
    (tmp_path / "notes.md").write_text("not data: a folder takes only supported files")
    ds = build_text_dataset(files_config(tmp_path), 0, 1)
    docs = ds.corpus.documents(Cursor(0, 0, 0, 0))
    assert sorted(next(docs)[1] for _ in range(3)) == ["first", "second", "whole\n\nfile, one document\n"]


def test_folder_skips_hidden_files_and_takes_any_suffix_case(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.JSONL", ["upper-case suffix"])
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jsonl", ["a copy: would be read twice"])
    (tmp_path / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07Mac OS X")  # macOS AppleDouble metadata
    assert [p.name for p in resolve_files(str(tmp_path))] == ["a.JSONL"]
    check_data_config(files_config(tmp_path))
    assert next(build_text_dataset(files_config(tmp_path), 0, 1).corpus.documents(Cursor(0, 0, 0, 0)))[1] == \
        "upper-case suffix"


def test_jsonl_record_with_a_lone_carriage_return(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "first",\r"id": 0}\r\n{"text": "second"}\n')  # CR: JSON whitespace
    docs = build_text_dataset(files_config(tmp_path / "d.jsonl"), 0, 1).corpus.documents(Cursor(0, 0, 0, 0))
    assert [next(docs)[1] for _ in range(2)] == ["first", "second"]


def test_later_epoch_without_a_document_for_a_rank_is_skipped(tmp_path: Path) -> None:
    """Three one-document files, one empty, two ranks: epoch 0 gives rank 1 "beta" (checked before
    launch), but some later shuffles give it only the empty document; those epochs are skipped."""
    for name, text in (("a", "alpha"), ("b", "beta"), ("c", "")):
        write_jsonl(tmp_path / f"{name}.jsonl", [text])
    cfg = files_config(tmp_path, "--debug.seed", "1")
    check_data_config(cfg, 2)
    corpus = build_text_dataset(cfg, 1, 2).corpus
    orders = [[p.stem for p in corpus.order(e)] for e in range(10)]
    empty = [e for e, order in enumerate(orders) if order[1] == "c"]  # epochs that give rank 1 nothing
    assert empty and empty[0] > 0, orders
    docs = corpus.documents(Cursor(0, 0, 0, 0))
    got = [next(docs) for _ in range(10 - len(empty))]
    assert [c.epoch for c, _ in got] == [e for e in range(10) if e not in empty]
    assert all(text in ("alpha", "beta") for _, text in got)


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = ["r0", "r1", None, "r3", "r4", "r5", "r6"]
    pq.write_table(pa.table({"text": texts, "n": list(range(7))}), tmp_path / "d.parquet", row_group_size=3)
    ds = build_text_dataset(files_config(tmp_path / "d.parquet"), 0, 1)
    docs = ds.corpus.documents(Cursor(0, 0, 0, 0))
    assert [next(docs) for _ in range(6)] == [(Cursor(0, 0, i, i), t) for i, t in enumerate(texts) if t]
    resumed = ds.corpus.documents(Cursor(0, 0, 4, 4))  # starts inside the second row group
    assert [next(resumed)[1] for _ in range(3)] == ["r4", "r5", "r6"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match='bad.parquet: no "text" or "input_ids" column'):
        build_text_dataset(files_config(tmp_path / "bad.parquet"), 0, 1)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="d.parquet: reading .parquet needs pyarrow"):
        build_text_dataset(files_config(tmp_path / "d.parquet"), 0, 1)


def test_vocab_check(tmp_path: Path) -> None:
    check_tokenizer_vocab(2048, 2048)
    with pytest.raises(ValueError, match="128256 tokens, more than the model's vocab_size 2048"):
        check_tokenizer_vocab(128256, 2048)
    big = tmp_path / "big.model"  # 2,000 ranks + 256 specials > the debug model's 2,048
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(32, 127) for b in range(32, 127)][:1744]
    big.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    with pytest.raises(ValueError, match=f"model.tokenizer_path: {big} has 2256 tokens"):
        build_text_dataset(config("--training.dataset", "stdlib", "--model.tokenizer_path", str(big)), 0, 1)
    assert build_text_dataset(config("--training.dataset", "stdlib", "--model.tokenizer_path", str(big),
                                     "--model.flavor", "1B"), 0, 1).tokenizer.n_words == 2256


BAD_INPUTS = {  # case -> (command-line arguments, {tmp} = the test's folder; expected message)
    "no path": (["--training.dataset", "files"], "training.dataset_path: required"),
    "glob matches nothing": (["{tmp}/none-*.jsonl"], "none-\\*.jsonl' matches no"),
    "missing file": (["{tmp}/missing.jsonl"], "no such file or folder: .*missing.jsonl"),
    "unsupported type": (["{tmp}/data.csv"], "data.csv: unsupported file type"),
    "jsonl without text": (["{tmp}/notext.jsonl"], 'notext.jsonl line 1: no "text" field'),
    "invalid json": (["{tmp}/badjson.jsonl"], "badjson.jsonl line 1: not valid JSON"),
    "text not a string": (["{tmp}/nonstring.jsonl"], 'nonstring.jsonl line 1: "text" is not a string'),
    "json array without text": (["{tmp}/arr.json"], 'arr.json element 0: no "text" field'),
    "missing tokenizer": (["--training.dataset", "stdlib", "--model.tokenizer_path", "{tmp}/nope.model"],
                          "model.tokenizer_path: cannot read .*nope.model"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_at_build(tmp_path: Path, case: str) -> None:
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "badjson.jsonl").write_text('{"text": "ok"\n')
    (tmp_path / "nonstring.jsonl").write_text('{"text": 3}\n')
    (tmp_path / "arr.json").write_text('[{"content": "x"}]')
    (tmp_path / "data.csv").write_text("text\nx\n")
    args, message = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    if not args[0].startswith("--"):  # a bare path is a files dataset_path
        args = ["--training.dataset", "files", "--training.dataset_path", *args]
    for check in (lambda cfg: build_text_dataset(cfg, 0, 1), check_data_config):  # at start-up and pre-launch
        with pytest.raises(ValueError, match=message) as err:
            check(config(*args))
        assert "\n" not in str(err.value)


def test_bad_input_while_streaming(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["fine", "also fine"])
    with path.open("a") as f:
        f.write('{"title": "no text"}\n')
    ds = build_text_dataset(files_config(path, "--training.packing", "false"), 0, 1)
    with pytest.raises(ValueError, match='d.jsonl line 3: no "text" field'):
        take(ds, 3)


@pytest.mark.parametrize("texts, dp_size, rank", [(["", "  \n", ""], 1, 0), (["only one"], 2, 1)])
def test_no_documents_for_a_rank(tmp_path: Path, texts: list[str], dp_size: int, rank: int) -> None:
    cfg = files_config(write_jsonl(tmp_path / "d.jsonl", texts))
    message = f"training.dataset_path: no non-empty document for data-parallel rank {rank} of {dp_size}"
    with pytest.raises(ValueError, match=message):
        take(build_text_dataset(cfg, rank, dp_size), 1)
    with pytest.raises(ValueError, match=message):  # also before launch
        check_data_config(cfg, dp_size)


def test_every_rank_has_a_document_before_launch(tmp_path: Path) -> None:
    # Documents 0-3 are dealt in turn: with 2 ranks rank 1 gets "" and "d", with 3 only "".
    cfg = files_config(write_jsonl(tmp_path / "d.jsonl", ["a", "", "c", "d"]))
    check_data_config(cfg, 2)
    with pytest.raises(ValueError, match="no non-empty document for data-parallel rank 1 of 3"):
        check_data_config(cfg, 3)
