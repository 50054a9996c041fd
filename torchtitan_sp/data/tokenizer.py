"""Llama 3's tokenizer: tiktoken byte-level BPE over a ranks file plus 256 special tokens, or a
Hugging Face tokenizer.json (HFTokenizer: the `tokenizers` model AutoTokenizer runs, same ids).

The ranks file has Llama 3's tokenizer.model format: one line per BPE token, "<base64 bytes> <rank>".
Split pattern and special tokens are Meta's (Llama 3.1 names), numbered right after the BPE ranks,
so the real 128,000-rank file gives <|begin_of_text|> = 128000 as in Meta's checkpoints, and the
shipped 1,792-rank file gives a 2,048-token vocabulary.

Which file (`tokenizer_file`): model.tokenizer_path when set; else model.hf_assets_path's tokenizer.json
(the file AutoTokenizer reads, so the ids are its ids), else its original/tokenizer.model (Meta's ranks);
without hf_assets_path the shipped assets/tokenizer/tokenizer.model.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import tiktoken

from torchtitan_sp.config import Model, resolve_repo_path

SHIPPED = "assets/tokenizer/tokenizer.model"

PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
SPECIAL_TOKENS = _NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>"
                                    for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))]

# tiktoken's regex runs out of backtracking stack on very long runs of whitespace (or of
# non-whitespace), so such runs are cut into pieces first, as Meta's tokenizer does. A match
# starts only where a run starts (the look-behinds): tried at every position inside a run, it
# would rescan the run's rest each time, quadratic in the run's length.
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tokenizer.model ranks file; any problem is a one-line ValueError naming the file."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ValueError(f"model.tokenizer_path: cannot read {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"model.tokenizer_path: {path} line {n} is not '<base64 token> <rank>' "
                             "(expected a Llama 3 tokenizer.model ranks file)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"model.tokenizer_path: {path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE needs every single byte, or some text cannot be encoded
        raise ValueError(f"model.tokenizer_path: {path} lacks {len(missing)} single-byte tokens "
                         f"(e.g. byte {missing[0]})")
    return ranks


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        ranks = load_ranks(self.path)
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]  # Llama 3.1's padding token

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Special-token strings inside `text` encode as ordinary text (data cannot inject them)."""
        ids = [self.bos_id] if bos else []
        for piece in _pieces(text):
            ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))


def _pieces(text: str) -> Iterator[str]:
    """`text` cut inside every run longer than MAX_RUN_CHARS (whole when there is none)."""
    start = 0
    for m in _LONG_RUN.finditer(text):
        for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


class HFTokenizer:
    """A Hugging Face tokenizer.json, run by the `tokenizers` library as AutoTokenizer runs it; BOS/EOS
    are the folder's tokenizer_config.json names (Llama 3's when absent)."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as HFModel
        except ImportError:
            raise ValueError(f"model.tokenizer_path: {path} is a tokenizer.json; reading it needs the tokenizers "
                             "package (pip install tokenizers)") from None
        self.path = Path(path)
        try:
            self.model = HFModel.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own exception type for unreadable or bad files
            raise ValueError(f"model.tokenizer_path: cannot read {self.path} as a tokenizer.json: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.model.encode_special_tokens = True  # special-token strings in data encode as text, as with tiktoken
        self.special_tokens = {t.content: i for i, t in self.model.get_added_tokens_decoder().items() if t.special}
        self.n_words = self.model.get_vocab_size(with_added_tokens=True)
        names = _bos_eos_names(self.path.parent / "tokenizer_config.json")
        ids = [self.model.token_to_id(name) for name in names]
        missing = [name for name, i in zip(names, ids) if i is None]
        if missing:
            raise ValueError(f"model.tokenizer_path: {self.path} has no token {missing[0]!r} (BOS/EOS)")
        self.bos_id, self.eos_id = ids
        self.pad_id = self.special_tokens.get("<|finetune_right_pad_id|>", self.eos_id)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Special-token strings inside `text` encode as ordinary text (data cannot inject them)."""
        ids = self.model.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=False)


def _bos_eos_names(config: Path) -> list[str]:
    """bos_token and eos_token of a tokenizer_config.json (a string or {"content": ...})."""
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for key in names:
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return list(names.values())


def tokenizer_file(m: Model) -> Path:
    """The tokenizer file a run reads (see the module docstring)."""
    if m.tokenizer_path:
        return resolve_repo_path(m.tokenizer_path)
    if m.hf_assets_path:
        folder = resolve_repo_path(m.hf_assets_path)
        for name in ("tokenizer.json", "original/tokenizer.model"):
            if (folder / name).is_file():
                return folder / name
        raise ValueError(f"model.hf_assets_path: {folder} has neither tokenizer.json nor original/tokenizer.model; "
                         "set model.tokenizer_path")
    return resolve_repo_path(SHIPPED)


def load_tokenizer(path: Path) -> Tokenizer | HFTokenizer:
    """A tokenizer.json (any *.json) through `tokenizers`, anything else as a tiktoken ranks file."""
    return HFTokenizer(path) if path.suffix == ".json" else Tokenizer(path)
