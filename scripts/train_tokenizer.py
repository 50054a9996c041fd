"""Train the small default tokenizer and write it in Llama 3's tokenizer.model ranks format.

Byte-level BPE (the `tokenizers` package, a dev dependency) over the default corpus, this
interpreter's standard-library source, pre-split with Llama 3's pattern so that tiktoken applies
the merges the same way. Ranks: the 256 single bytes (in byte order), then the merges in the order
they were learned. 1,792 ranks + 256 special tokens = 2,048 = the debug model's vocabulary.
Deterministic for a given interpreter; the shipped file was built with CPython 3.11.7:

    python scripts/train_tokenizer.py [--vocab-size 1792] [--output assets/tokenizer/tokenizer.model]
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from torchtitan_sp.data.text import read_text, stdlib_files  # noqa: E402
from torchtitan_sp.data.tokenizer import PAT_STR  # noqa: E402


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` tokens, all 256 single bytes included."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    return tok


def bpe_ranks(tok: Tokenizer) -> list[bytes]:
    """The tokens as raw bytes in rank order: single bytes, then merges in the order learned."""
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    merged = sorted((i, s) for s, i in tok.get_vocab().items() if len(s) > 1)  # ids follow merge order
    return [bytes([b]) for b in range(256)] + [bytes(to_byte[c] for c in s) for _, s in merged]


def write_ranks(tokens: list[bytes], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=1792, help="BPE ranks (special tokens come on top)")
    ap.add_argument("--output", default=str(REPO_ROOT / "assets/tokenizer/tokenizer.model"))
    args = ap.parse_args()
    tokens = bpe_ranks(train((read_text(p) for p in stdlib_files()), args.vocab_size))
    write_ranks(tokens, Path(args.output))
    print(f"wrote {len(tokens)} ranks to {args.output}")


if __name__ == "__main__":
    main()
