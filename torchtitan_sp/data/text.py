"""Real text: this interpreter's standard-library source (`stdlib`) or local files (`files`),
streamed, sharded over data-parallel ranks, tokenized, then packed or padded (see packing.py).

Documents: a .txt file (and a stdlib .py file) is one document, read whole (long-context training
wants long documents; split a huge corpus into files, or use JSON lines). A .jsonl line, an element
of a .json array, or a .parquet row is one document: its "text" field, or pre-tokenized "input_ids"
(+ optional "labels", -100 = not a target), used as stored; a .npy array holds token ids (a row per
document, or one 1-D stream). Text decodes as UTF-8 with bad bytes replaced; empty documents are
skipped. The record layer (records(), Corpus) is shared with chat.py, which parses records its way.

Order: each epoch shuffles the file list with a generator seeded by (debug.seed, epoch); documents
keep their order inside a file. Sharding: the epoch's documents are numbered in that order and
dp rank r of d takes numbers r, r + d, ... (cp and tp ranks pass the same dp rank, so they get the
same samples); other ranks' documents are counted, never tokenized (nor parsed in .txt, .jsonl and
.npy; every rank json.loads a whole .json array and reads parquet row groups' columns).

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

from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.config import Config, resolve_repo_path
from torchtitan_sp.data.packing import Packer, padded_sample
from torchtitan_sp.data.tokenizer import HFTokenizer, Tokenizer, tokenizer_file
from torchtitan_sp.data.tokenizer import load_tokenizer as read_tokenizer
from torchtitan_sp.models.shape import model_args

PLAIN = (".txt", ".py")  # .py only comes from the stdlib corpus
SUPPORTED = (".txt", ".jsonl", ".json", ".parquet", ".npy")
TEXT_COLUMNS = ("text", "input_ids", "labels")  # the parquet columns a files corpus reads
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class Cursor(NamedTuple):
    epoch: int
    file: int  # index in the epoch's file order
    item: int  # record index inside the file
    doc: int  # document number inside the epoch (decides the dp rank)


class TokenDoc(NamedTuple):
    """A pre-tokenized document: ids as stored (no BOS/EOS added), targets with IGNORE_INDEX
    where the record's labels mask a token (None: every token is a target)."""
    ids: list[int]
    targets: list[int] | None


Document = Any  # str (text), TokenDoc, or a chat conversation (a list of (role, content))
Parse = Callable[[Path, str, Any], Document]  # (file, "line 3", record) -> document; raises DataError


class DataError(ValueError):
    """A bad record found while reading: one line naming the file and the record."""


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


def resolve_files(pattern: str, key: str = "training.dataset_path",
                  supported: tuple[str, ...] = SUPPORTED) -> list[Path]:
    """A path pattern -> sorted files: a file, a folder (searched recursively) or a glob."""
    kinds = "/".join(supported)
    if not pattern:
        raise ValueError(f"{key}: empty; give a file, a folder or a glob of {kinds} files")
    expanded = os.path.expanduser(pattern)
    if glob.has_magic(expanded):
        matches = [Path(m) for m in glob.glob(expanded, recursive=True)]
    else:
        path = resolve_repo_path(pattern)
        if not path.exists():
            raise ValueError(f"{key}: no such file or folder: {pattern}")
        matches = [path]
    files = set()
    for m in matches:
        if m.is_dir():  # hidden files and folders (.ipynb_checkpoints, macOS ._ files) are not data
            files.update(f for f in m.rglob("*") if _suffix(f) in supported and f.is_file()
                         and not any(part.startswith(".") for part in f.relative_to(m).parts))
        elif _suffix(m) in supported:
            files.add(m)
        else:
            raise ValueError(f"{key}: {m}: unsupported file type; use {', '.join(supported)}")
    if not files:
        raise ValueError(f"{key}: {pattern!r} matches no {kinds} file")
    return sorted(files)


def check_file(path: Path, columns: tuple[str, ...], needs: str, parse: Parse) -> None:
    """Fail at start-up, not mid-run, on a file whose first record is unusable (or no pyarrow).
    `columns`: the parquet columns the dataset reads; `needs` says which (one of them must exist)."""
    if _suffix(path) == ".parquet":
        pq = _parquet_module(path)
        try:
            names = pq.read_schema(path).names
        except Exception as e:  # pyarrow raises its own error types for files that are not parquet
            raise ValueError(f"training.dataset_path: {path}: not a readable parquet file ({e})") from None
        if not set(columns) & set(names):
            raise ValueError(f"training.dataset_path: {path}: no {needs} column (columns: {', '.join(names)})")
    elif _suffix(path) not in PLAIN:
        first = next(records(path, 0, columns), None)
        if first is not None:
            record = first[1]()
            if record is not None:
                parse(path, first[0], record)


def check_tokenizer_vocab(n_words: int, model_vocab: int, source: str = "the tokenizer") -> None:
    if n_words > model_vocab:
        raise ValueError(f"model.tokenizer_path: {source} has {n_words} tokens, more than the model's "
                         f"vocab_size {model_vocab}; choose a larger model.flavor or a smaller tokenizer")


def records(path: Path, start: int, columns: tuple[str, ...]) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The file's records from index `start` on, each as (where, read): `where` names it in errors
    ("line 3"), read() returns it (a dict; None for a blank line or an all-null parquet row), so
    that only the rank that owns a record parses it (.txt, .jsonl, .npy rows); a .json array and
    a parquet row group's columns are read whole by every rank; only the owner tokenizes."""
    if _suffix(path) in PLAIN:
        if start == 0:
            yield "", lambda: {"text": read_text(path)}
    elif _suffix(path) == ".parquet":
        yield from _parquet_records(path, start, columns)
    elif _suffix(path) == ".npy":
        yield from _npy_records(path, start)
    elif _is_json_array(path):
        try:
            items = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"training.dataset_path: {path}: not valid JSON ({e})") from None
        for i in range(start, len(items)):
            yield f"element {i}", partial(lambda r: r, items[i])
    else:
        # newline="\n": a lone CR is JSON whitespace, not the end of a record.
        with path.open(encoding="utf-8-sig", errors="replace", newline="\n") as f:
            for lineno, line in enumerate(islice(f, start, None), start + 1):
                yield f"line {lineno}", partial(_json_line, path, lineno, line)


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"["


def _json_line(path: Path, lineno: int, line: str) -> Any:
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"training.dataset_path: {path} line {lineno}: not valid JSON ({e})") from None


NPY_PIECE_TOKENS = 2**20  # a 1-D .npy stream is read in documents of this many tokens


def _npy_records(path: Path, start: int) -> Iterator[tuple[str, Callable[[], Any]]]:
    """A 2-D array of token ids has a document per row; a 1-D array is one token stream, read in
    pieces of NPY_PIECE_TOKENS (each its own document: store documents as rows, or as .jsonl
    records, where their boundaries matter). Memory-mapped: only the owner's pieces are read."""
    import numpy as np
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"training.dataset_path: {path}: not a readable .npy array ({e})") from None
    if array.ndim not in (1, 2) or array.dtype.kind not in "iu":
        raise ValueError(f"training.dataset_path: {path}: a .npy corpus is a 1-D or 2-D integer array of "
                         f"token ids, got {array.ndim}-D {array.dtype}")
    n = len(array) if array.ndim == 2 else -(-len(array) // NPY_PIECE_TOKENS)
    for i in range(start, n):
        piece = array[i] if array.ndim == 2 else array[i * NPY_PIECE_TOKENS:(i + 1) * NPY_PIECE_TOKENS]
        yield ("row" if array.ndim == 2 else "piece") + f" {i}", partial(lambda r: {"input_ids": r.tolist()}, piece)


def parse_text(vocab_size: int) -> Parse:
    """A files corpus record: "text" (tokenized here) or pre-tokenized "input_ids" (+ "labels")."""
    return partial(_text_document, vocab_size)


def _text_document(vocab_size: int, path: Path, where: str, record: Any) -> Document:
    if isinstance(record, dict) and "text" not in record and "input_ids" in record:
        return token_document(path, where, record, vocab_size)
    if isinstance(record, dict) and "text" not in record and ("messages" in record or "prompt" in record):
        raise DataError(f"training.dataset_path: {path} {where}: a chat record (\"messages\" or \"prompt\"): "
                        "set training.dataset = 'chat'")
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f"training.dataset_path: {path} {where}: no \"text\" field "
                        "(each record must be an object with a \"text\" string, or pre-tokenized \"input_ids\")")
    if not isinstance(record["text"], str):
        raise DataError(f"training.dataset_path: {path} {where}: \"text\" is not a string")
    return record["text"]


def token_document(path: Path, where: str, record: dict[str, Any], vocab_size: int) -> TokenDoc:
    """Pre-tokenized "input_ids" (ints in [0, vocab_size)) and optional "labels" of the same length
    (-100 = not a target, else the token's id, as Hugging Face datasets store them)."""
    ids, labels = record["input_ids"], record.get("labels")
    at = f"training.dataset_path: {path} {where}"
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{at}: \"input_ids\" is not a list of integers")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise DataError(f"{at}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    if labels is None:
        return TokenDoc(ids, None)
    if (not isinstance(labels, list) or len(labels) != len(ids)
            or any(lab != IGNORE_INDEX and lab != i for lab, i in zip(labels, ids))):
        raise DataError(f"{at}: \"labels\" must have one entry per input id: the id itself or {IGNORE_INDEX}")
    return TokenDoc(ids, labels)


def is_empty(doc: Document) -> bool:
    if isinstance(doc, str):
        return not doc.strip()
    return len(doc.ids if isinstance(doc, TokenDoc) else doc) == 0


def _parquet_module(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq  # optional: only .parquet corpora need it
    except ImportError:
        raise ValueError(f"training.dataset_path: {path}: reading .parquet needs pyarrow "
                         "(pip install pyarrow)") from None
    return pq


def _parquet_records(path: Path, start: int, columns: tuple[str, ...]) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Rows as dicts of the dataset's columns that the file has, one row group in memory at a time;
    a resume skips whole groups. A row whose values are all null is an empty document."""
    pf = _parquet_module(path).ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > start:
            table = pf.read_row_group(g, columns=present)
            values = {c: table.column(c).to_pylist() for c in present}
            for i in range(max(start - first, 0), n):
                row = {c: values[c][i] for c in present if values[c][i] is not None}
                yield f"row {first + i}", partial(lambda r: r or None, row)
        first += n


class Corpus:
    """A fixed file list, shuffled per epoch, read as one dp rank's share of documents."""

    def __init__(self, files: list[Path], seed: int, dp_rank: int, dp_size: int, key: str, parse: Parse,
                 columns: tuple[str, ...] = TEXT_COLUMNS):
        self.files, self.seed, self.dp_rank, self.dp_size, self.key = files, seed, dp_rank, dp_size, key
        self.parse, self.columns = parse, columns

    def order(self, epoch: int) -> list[Path]:
        files = list(self.files)
        random.Random(f"{self.seed}/{epoch}").shuffle(files)
        return files

    def document(self, path: Path, where: str, read: Callable[[], Any]) -> Document | None:
        """A record parsed, or None when it is empty."""
        record = read()
        doc = None if record is None else self.parse(path, where, record)
        return None if doc is None or is_empty(doc) else doc

    def documents(self, start: Cursor) -> Iterator[tuple[Cursor, Document]]:
        """This rank's non-empty documents from `start` on, forever: (cursor, document)."""
        epoch, first_file, first_item, doc = start
        while True:
            whole_epoch, found = first_file == 0 and first_item == 0, False
            for f, path in enumerate(self.order(epoch)[first_file:], first_file):
                for item, (where, read) in enumerate(records(path, first_item, self.columns), first_item):
                    if doc % self.dp_size == self.dp_rank:
                        document = self.document(path, where, read)
                        if document is not None:
                            found = True
                            yield Cursor(epoch, f, item, doc), document
                    doc += 1
                first_item = 0
            # Epoch 0 is checked before launch (sources.check_data_config). A later epoch's shuffle can leave
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

    def _tokens(self, doc: str | TokenDoc) -> tuple[list[int], list[int] | None]:
        if isinstance(doc, TokenDoc):  # pre-tokenized: as stored
            return doc.ids, doc.targets
        return self.tokenizer.encode(doc, bos=True, eos=True), None

    def _packed(self) -> Iterator[dict[str, torch.Tensor]]:
        packer = Packer(self.seq_len, self.offset)
        for cursor, doc in self.corpus.documents(self.cursor):
            packer.add(cursor, *self._tokens(doc))
            while packer.full():
                sample = packer.pop()
                self.cursor, self.offset = packer.head, packer.offset  # set before yielding: the state a loader saves
                yield sample

    def _padded(self) -> Iterator[dict[str, torch.Tensor]]:
        for cursor, doc in self.corpus.documents(self.cursor):
            ids, targets = self._tokens(doc)
            sample = padded_sample(ids, self.seq_len, self.tokenizer.pad_id, targets)
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


def load_tokenizer(cfg: Config) -> Tokenizer | HFTokenizer:
    """The run's tokenizer (data.tokenizer.tokenizer_file picks the file), checked against the vocabulary."""
    path = tokenizer_file(cfg.model)
    tokenizer = read_tokenizer(path)
    check_tokenizer_vocab(tokenizer.n_words, model_args(cfg.model).vocab_size, str(path))
    return tokenizer


TEXT_NEEDS = '"text" or "input_ids"'


def text_corpus(cfg: Config, pattern: str | None, dp_rank: int, dp_size: int, seed: int) -> Corpus:
    """The stdlib corpus (pattern None) or the files of `pattern`, each checked."""
    parse = parse_text(model_args(cfg.model).vocab_size)
    if pattern is None:
        return Corpus(stdlib_files(), seed, dp_rank, dp_size, "training.dataset", parse)
    files = resolve_files(pattern)
    for f in files:
        check_file(f, TEXT_COLUMNS, TEXT_NEEDS, parse)
    return Corpus(files, seed, dp_rank, dp_size, "training.dataset_path", parse)


def check_ranks_have_documents(corpus: Corpus, dp_size: int, scan_all: bool) -> None:
    """That every data-parallel rank gets a document in the first epoch (document d goes to rank
    d mod dp_size, so a corpus of fewer documents than ranks fails at the first step); with
    `scan_all` every record is parsed (a bad one fails here, before launch, not mid-run)."""
    missing, doc = set(range(dp_size)), 0
    for path in corpus.order(0):
        for where, read in records(path, 0, corpus.columns):
            if (scan_all or doc % dp_size in missing) and corpus.document(path, where, read) is not None:
                missing.discard(doc % dp_size)
                if not missing and not scan_all:
                    return
            doc += 1
    if missing:
        raise ValueError(f"{corpus.key}: no non-empty document for data-parallel rank {min(missing)} of {dp_size} "
                         f"({len(corpus.files)} files hold {doc} documents, dealt to the ranks in turn; a .txt file "
                         f"is one document)")


def build_text_dataset(cfg: Config, dp_rank: int, dp_size: int) -> TextDataset:
    """The `stdlib` or `files` dataset of one source; bad input raises a one-line ValueError naming the key and file."""
    t = cfg.training
    corpus = text_corpus(cfg, None if t.dataset == "stdlib" else t.dataset_path, dp_rank, dp_size, cfg.debug.seed)
    return TextDataset(corpus, load_tokenizer(cfg), t.seq_len, t.packing)
