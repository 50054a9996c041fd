"""The Llama 3-format tokenizer: the shipped file, round trips, special tokens, bad files, and the
training script's conversion (byte-for-byte the same tokens as the `tokenizers` model)."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

from torchtitan_sp.config import REPO_ROOT, resolve_repo_path
from torchtitan_sp.data.text import read_text, stdlib_files
from torchtitan_sp.data.tokenizer import _LONG_RUN, MAX_RUN_CHARS, SPECIAL_TOKENS, Tokenizer
from torchtitan_sp.models.llama3 import FLAVORS

SHIPPED = resolve_repo_path("assets/tokenizer/tokenizer.model")

MIXED = [
    "Hello, world! It's a test; we're done.",
    "Ünïcödé àccents: café, naïve, façade, Øre, İstanbul, ß",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🦙🔥👍🏽 👨‍👩‍👧 flags 🇫🇷 and ✓ ∑ ∫ ≠ → ∞",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\r\n\n\n    pass\n",
    "numbers 1234567890 3.14159 -42 0x1F",
    "   leading and trailing spaces   \n\n",
    "<|begin_of_text|> and <|eot_id|> typed as plain text",
    "\x00\x01 control \x7f chars and a lone \ufffd",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(SHIPPED)


def load_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer", REPO_ROOT / "scripts/train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_ranks(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def test_shipped_file_fits_debug_model(tok: Tokenizer) -> None:
    lines = SHIPPED.read_text().splitlines()
    assert len(lines) == 1792
    assert tok.n_words == 1792 + 256 <= FLAVORS["debug"].vocab_size
    assert SHIPPED.stat().st_size < 64 * 1024


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    body = ids[1:-1]
    assert all(0 <= i < 1792 for i in body)  # special-token strings in text stay ordinary text
    assert tok.decode(body) == text
    assert tok.encode(text, bos=False, eos=False) == body


def test_compresses_code(tok: Tokenizer) -> None:
    text = read_text(stdlib_files()[0])
    assert len(text) / len(tok.encode(text, bos=False, eos=False)) > 2.5


def test_long_runs(tok: Tokenizer) -> None:
    # tiktoken's regex overflows on runs this long unless they are cut first
    for text in (" " * 200_000, "x" * 60_001 + "\n" * 30_000 + "y"):
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    # The cut finds a run only where it starts: a match tried inside every run would rescan the
    # rest of it each time (quadratic: seconds per long base64 blob or minified line).
    run = "ab " + "x" * (MAX_RUN_CHARS + 5)
    assert [m.span() for m in _LONG_RUN.finditer(run)] == [(3, len(run))]
    assert _LONG_RUN.match(run, 4) is None and _LONG_RUN.match(" " * (MAX_RUN_CHARS + 5), 1) is None


def test_special_tokens_follow_ranks(tok: Tokenizer, tmp_path: Path) -> None:
    assert len(SPECIAL_TOKENS) == len(set(SPECIAL_TOKENS)) == 256
    assert SPECIAL_TOKENS[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    ids = tok.special_tokens
    assert (tok.bos_id, tok.eos_id) == (1792, 1793)
    assert (ids["<|start_header_id|>"], ids["<|end_header_id|>"], ids["<|eot_id|>"]) == (1798, 1799, 1801)
    assert sorted(ids.values()) == list(range(1792, 2048))
    assert tok.decode([tok.bos_id, tok.eos_id]) == "<|begin_of_text|><|end_of_text|>"
    # numbering depends only on the rank count: a 300-rank file puts BOS at 300, as Meta's 128000-rank file at 128000
    pairs = [bytes([a, b]) for a in b"abcdefghijk" for b in b"aeiou"][:44]
    small = Tokenizer(write_ranks(tmp_path / "small.model", [bytes([b]) for b in range(256)] + pairs))
    assert (small.n_words, small.bos_id, small.special_tokens["<|eot_id|>"]) == (556, 300, 309)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{\"model\": {\"type\": \"BPE\"}}\n", "line 1 is not"),
    ("IQ== 0\nnot-base64! 1\n", "line 2 is not"),
    ("".join(f"{base64.b64encode(bytes([b])).decode()} {b * 2}\n" for b in range(256)), "ranks are not"),
    ("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(255)), "lacks 1 single-byte"),
])
def test_bad_file(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        Tokenizer(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("model.tokenizer_path:")


def test_training_script_conversion(tmp_path: Path) -> None:
    """The ranks file makes tiktoken produce exactly the tokens the trained BPE model produces."""
    pytest.importorskip("tokenizers")
    script = load_script()
    texts = [read_text(p) for p in stdlib_files()[:40]] + MIXED
    hf = script.train(texts, 600)
    ranks = script.bpe_ranks(hf)
    assert len(ranks) == 600 and ranks[:256] == [bytes([b]) for b in range(256)] and len(set(ranks)) == 600
    tok = Tokenizer(write_ranks(tmp_path / "t.model", ranks))
    to_byte = {c: b for b, c in script.bytes_to_unicode().items()}
    for text in [read_text(p) for p in stdlib_files()[40:46]] + MIXED:
        expected = [bytes(to_byte[c] for c in s) for s in hf.encode(text).tokens]
        assert [tok.model.decode_single_token_bytes(i) for i in tok.encode(text, False, False)] == expected
