"""Real text: this interpreter's standard-library source (`stdlib`) or local files (`files`),
streamed, sharded over data-parallel ranks, tokenized, then packed or padded (see packing.py).

Documents: a .txt file (and a stdlib .py file) is one document, read whole (long-context training
wants long documents; split a huge corpus into files, or use JSON lines). A .jsonl line, an element
of a .json array, or a .parquet row is one document: its "text" field. Text decodes as UTF-8 with
bad bytes replaced; empty documents are skipped.

Order: each epoch shuffles the file list with a generator seeded by (debug.seed, epoch); documents
keep their order inside a file. Sharding: the epoch's documents are numbered in that order and
dp rank r of d takes numbers r, r + d, ... (cp and tp ranks pass the same dp rank, so they get the
same samples); other ranks' documents are counted, never tokenized (nor parsed in .txt and .jsonl;
every rank json.loads a whole .json array and reads parquet row groups' text column).

Resume: the state names the document the next sample starts in, (epoch, file, item, doc), and the
tokens of it already used (offset); loading it re-tokenizes that one document, so the next samples
equal those of the uninterrupted run. On another dp degree (resume_after) every new rank starts
after the furthest document any old rank reached: no document is seen twice; the few that old ranks
had not reached yet are skipped.
"""

from __future__ import annotations

import glob
import json
import os
import random
import sysconfig
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils.data import IterableDataset

from torchtitan_sp.config import Config, resolve_repo_path
from torchtitan_sp.data.packing import Packer, padded_sample
from torchtitan_sp.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, tokenizer_file
from torchtitan_sp.models.shape import model_args

PLAIN = (".txt", ".py")  # .py only comes from the stdlib corpus
SUPPORTED = (".txt", ".jsonl", ".json", ".parquet")
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class Cursor(NamedTuple):
    epoch: int
    file: int  # index in the epoch's file order
    item: int  # record index inside the file
    doc: int  # document number inside the epoch (decides the dp rank)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig", errors="replace")


def stdlib_files() -> list[Path]:
    """The *.py files of this interpreter's standard library, sorted, without tests or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]  # prune: site-packages can be huge
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    if not files:
        raise ValueError(f"training.dataset: 'stdlib' found no .py files under {root}")
    return sorted(files)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def resolve_files(pattern: str) -> list[Path]:
    """training.dataset_path -> sorted files: a file, a folder (searched recursively) or a glob."""
    if not pattern:
        raise ValueError("training.dataset_path: empty; give a file, a folder or a glob of "
                         ".txt/.jsonl/.json/.parquet files")
    expanded = os.path.expanduser(pattern)
    if glob.has_magic(expanded):
        matches = [Path(m) for m in glob.glob(expanded, recursive=True)]
    else:
        path = resolve_repo_path(pattern)
        if not path.exists():
            raise ValueError(f"training.dataset_path: no such file or folder: {pattern}")
        matches = [path]
    files = set()
    for m in matches:
        if m.is_dir():  # hidden files and folders (.ipynb_checkpoints, macOS ._ files) are not data
            files.update(f for f in m.rglob("*") if _suffix(f) in SUPPORTED and f.is_file()
                         and not any(part.startswith(".") for part in f.relative_to(m).parts))
        elif _suffix(m) in SUPPORTED:
            files.add(m)
        else:
            raise ValueError(f"training.dataset_path: {m}: unsupported file type; use .txt, .jsonl, .json or .parquet")
    if not files:
        raise ValueError(f"training.dataset_path: {pattern!r} matches no .txt/.jsonl/.json/.parquet file")
    return sorted(files)


def check_file(path: Path) -> None:
    """Fail at start-up, not mid-run, on a file whose first record has no text (or no pyarrow)."""
    if _suffix(path) == ".parquet":
        pq = _parquet_module(path)
        try:
            names = pq.read_schema(path).names
        except Exception as e:  # pyarrow raises its own error types for files that are not parquet
            raise ValueError(f"training.dataset_path: {path}: not a readable parquet file ({e})") from None
        if "text" not in names:
            raise ValueError(f"training.dataset_path: {path}: no \"text\" column (columns: {', '.join(names)})")
    elif _suffix(path) not in PLAIN:
        first = next(_records(path, 0), None)
        if first is not None:
            first()


def check_tokenizer_vocab(n_words: int, model_vocab: int, source: str = "the tokenizer") -> None:
    if n_words > model_vocab:
        raise ValueError(f"model.tokenizer_path: {source} has {n_words} tokens, more than the model's "
                         f"vocab_size {model_vocab}; choose a larger model.flavor or a smaller tokenizer")


def _records(path: Path, start: int) -> Iterator[Callable[[], str]]:
    """The file's records from index `start` on, each a call that returns its text, so that only
    the rank that owns a record parses it (.txt, .jsonl); a .json array and a parquet row group's
    "text" column are read whole by every rank; only the owner tokenizes."""
    if _suffix(path) in PLAIN:
        if start == 0:
            yield partial(read_text, path)
    elif _suffix(path) == ".parquet":
        yield from _parquet_records(path, start)
    elif _is_json_array(path):
        try:
            records = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"training.dataset_path: {path}: not valid JSON ({e})") from None
        for i in range(start, len(records)):
            yield partial(_text_field, path, f"element {i}", records[i])
    else:
        # newline="\n": a lone CR is JSON whitespace, not the end of a record.
        with path.open(encoding="utf-8-sig", errors="replace", newline="\n") as f:
            for lineno, line in enumerate(islice(f, start, None), start + 1):
                yield partial(_json_line, path, lineno, line)


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"["


def _json_line(path: Path, lineno: int, line: str) -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"training.dataset_path: {path} line {lineno}: not valid JSON ({e})") from None
    return _text_field(path, f"line {lineno}", record)


def _text_field(path: Path, where: str, record: Any) -> str:
    if not isinstance(record, dict) or "text" not in record:
        raise ValueError(f"training.dataset_path: {path} {where}: no \"text\" field "
                         "(each record must be an object with a \"text\" string)")
    if not isinstance(record["text"], str):
        raise ValueError(f"training.dataset_path: {path} {where}: \"text\" is not a string")
    return record["text"]


def _parquet_module(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq  # optional: only .parquet corpora need it
    except ImportError:
        raise ValueError(f"training.dataset_path: {path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    return pq


def _parquet_records(path: Path, start: int) -> Iterator[Callable[[], str]]:
    """Rows of the "text" column, one row group in memory at a time; a resume skips whole groups."""
    pf = _parquet_module(path).ParquetFile(path)
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > start:
            column = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
            for i in range(max(start - first, 0), n):
                yield partial(_parquet_text, path, first + i, column[i])
        first += n


def _parquet_text(path: Path, row: int, value: Any) -> str:
    if value is None:  # a null row is an empty document
        return ""
    if not isinstance(value, str):
        raise ValueError(f"training.dataset_path: {path} row {row}: \"text\" is not a string")
    return value


class Corpus:
    """A fixed file list, shuffled per epoch, read as one dp rank's share of documents."""

    def __init__(self, files: list[Path], seed: int, dp_rank: int, dp_size: int, key: str):
        self.files, self.seed, self.dp_rank, self.dp_size, self.key = files, seed, dp_rank, dp_size, key

    def order(self, epoch: int) -> list[Path]:
        files = list(self.files)
        random.Random(f"{self.seed}/{epoch}").shuffle(files)
        return files

    def documents(self, start: Cursor) -> Iterator[tuple[Cursor, str]]:
        """This rank's non-empty documents from `start` on, forever: (cursor, text)."""
        epoch, first_file, first_item, doc = start
        while True:
            whole_epoch, found = first_file == 0 and first_item == 0, False
            for f, path in enumerate(self.order(epoch)[first_file:], first_file):
                for item, text_of in enumerate(_records(path, first_item), first_item):
                    if doc % self.dp_size == self.dp_rank:
                        text = text_of()
                        if text.strip():
                            found = True
                            yield Cursor(epoch, f, item, doc), text
                    doc += 1
                first_item = 0
            # Epoch 0 is checked before launch (check_data_config). A later epoch's shuffle can leave
            # a rank only empty documents in a tiny corpus: that epoch is skipped.
            if whole_epoch and not found and epoch == 0:  # else the stream would spin forever
                raise ValueError(f"{self.key}: no non-empty document for data-parallel rank {self.dp_rank} "
                                 f"of {self.dp_size} ({len(self.files)} files hold {doc} documents)")
            epoch, first_file, doc = epoch + 1, 0, 0


class TextDataset(IterableDataset):
    """An infinite, resumable stream of packed (or padded) samples of one dp rank."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer | HFTokenizer, seq_len: int, packing: bool):
        self.corpus, self.tokenizer, self.seq_len, self.packing = corpus, tokenizer, seq_len, packing
        self.cursor, self.offset = Cursor(0, 0, 0, 0), 0  # where the next sample starts

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._packed() if self.packing else self._padded()

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=True, eos=True)

    def _packed(self) -> Iterator[dict[str, torch.Tensor]]:
        packer = Packer(self.seq_len, self.offset)
        for cursor, text in self.corpus.documents(self.cursor):
            packer.add(cursor, self._tokens(text))
            while packer.full():
                sample = packer.pop()
                self.cursor, self.offset = packer.head, packer.offset  # set before yielding: the state a loader saves
                yield sample

    def _padded(self) -> Iterator[dict[str, torch.Tensor]]:
        for cursor, text in self.corpus.documents(self.cursor):
            sample = padded_sample(self._tokens(text), self.seq_len, self.tokenizer.pad_id)
            self.cursor = cursor._replace(item=cursor.item + 1, doc=cursor.doc + 1)
            yield sample

    def state_dict(self) -> dict[str, int]:
        return {**self.cursor._asdict(), "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = Cursor(*(int(state[k]) for k in Cursor._fields))
        self.offset = int(state["offset"])


def resume_after(states: list[dict[str, int]]) -> dict[str, int]:
    """The state that continues the text stream on any dp degree, from every old dp rank's state:
    the first document none of them has used any of. Documents are numbered in epoch order and
    rank r of d uses only numbers r, r + d, ...; everything before each rank's cursor is used."""
    cursors = [(Cursor(*(int(st[k]) for k in Cursor._fields)), int(st["offset"])) for st in states]
    cursor, offset = max(cursors, key=lambda c: (c[0].epoch, c[0].doc))
    if offset > 0:  # its owner has used part of it: start at the next one
        cursor = cursor._replace(item=cursor.item + 1, doc=cursor.doc + 1)
    return {**cursor._asdict(), "offset": 0}


def _checked_inputs(cfg: Config) -> tuple[Tokenizer | HFTokenizer, list[Path], str]:
    """The tokenizer, the corpus files and the config key that names them, all checked."""
    path = tokenizer_file(cfg.model)
    tokenizer = load_tokenizer(path)
    check_tokenizer_vocab(tokenizer.n_words, model_args(cfg.model).vocab_size, str(path))
    if cfg.training.dataset == "stdlib":
        return tokenizer, stdlib_files(), "training.dataset"
    files = resolve_files(cfg.training.dataset_path)
    for f in files:
        check_file(f)
    return tokenizer, files, "training.dataset_path"


def check_data_config(cfg: Config, dp_size: int = 1) -> None:
    """The start-up checks of build_text_dataset, run before any process starts (validate.py), and
    that every data-parallel rank gets a document in the first epoch (document d goes to rank
    d mod dp_size, so a corpus of fewer documents than ranks fails at the first step)."""
    _, files, key = _checked_inputs(cfg)
    missing, doc = set(range(dp_size)), 0
    for path in Corpus(files, cfg.debug.seed, 0, 1, key).order(0):
        for text_of in _records(path, 0):
            if doc % dp_size in missing and text_of().strip():
                missing.discard(doc % dp_size)
                if not missing:
                    return
            doc += 1
    raise ValueError(f"{key}: no non-empty document for data-parallel rank {min(missing)} of {dp_size} "
                     f"({len(files)} files hold {doc} documents, dealt to the ranks in turn; a .txt file is "
                     f"one document)")


def build_text_dataset(cfg: Config, dp_rank: int, dp_size: int) -> TextDataset:
    """The `stdlib` or `files` dataset; bad input raises a one-line ValueError naming the key and file."""
    tokenizer, files, key = _checked_inputs(cfg)
    t = cfg.training
    return TextDataset(Corpus(files, cfg.debug.seed, dp_rank, dp_size, key), tokenizer, t.seq_len, t.packing)
