"""Passkey retrieval: a random key stated at some depth of a long haystack, asked for at its end.

A trial is one sequence of `length` tokens: BOS, filler, the needle ("The pass key is 12345.
Remember it. 12345 is the pass key.") at `depth` of the filler, more filler, the question ("What is
the pass key? The pass key is") and the key. Scoring is teacher-forced: the trial passes when the
model's argmax predicts every token of the key after the question. The filler is the validation
corpus (its first documents, concatenated) or, with synthetic validation data, a fixed text.

Trials run on the training mesh like validation batches: each cp rank holds its shard of the
haystack (the key's tokens sit in the last chunk, i.e. on cp rank 0 under head-tail), dp ranks
split the trials. Results: passkey_accuracy {"<length>": {"<depth>": accuracy}} in metrics.jsonl,
<dump_folder>/passkey/passkey.json and passkey.png (length x depth heatmap, drawn here without
matplotlib: a runtime dependency for one picture is not worth it), and the image in TensorBoard.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from torchtitan_sp.attention.sharding import IGNORE_INDEX
from torchtitan_sp.config import ConfigError
from torchtitan_sp.data.packing import empty_batch
from torchtitan_sp.data.text import load_tokenizer
from torchtitan_sp.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from torchtitan_sp.evaluate import Evaluator

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"passkey.lengths: {text!r} is not a comma-separated list of token counts") from None
    bad = [n for n in lengths if n < 1]
    if bad:
        raise ConfigError(f"passkey.lengths: {bad[0]} is not a positive number of tokens")
    return lengths


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"passkey.depths: {text!r} is not a comma-separated list of fractions in 0..1") from None
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise ConfigError(f"passkey.depths: {bad[0] if bad else text!r} is outside 0..1 (0 = the haystack's start, "
                          "1 = its end)")
    return depths


def key_tokens(tokenizer: Tokenizer, key: str) -> list[int]:
    return tokenizer.encode(" " + key, bos=False, eos=False)


def trial_overhead(tokenizer: Tokenizer, digits: int) -> int:
    """Tokens of a trial besides the filler, at most: BOS, the needle and the question, the key's three
    statements at one token per digit plus one for a space each."""
    needle = tokenizer.encode(NEEDLE.format(key=""), bos=False, eos=False)
    return 1 + len(needle) + len(tokenizer.encode(QUESTION, bos=False, eos=False)) + 3 * (digits + 1)


def make_trial(tokenizer: Tokenizer, filler: list[int], length: int, depth: float, key: str,
               offset: int) -> dict[str, torch.Tensor]:
    """One haystack of `length` input tokens; labels are ignored except the key's after the question."""
    needle = tokenizer.encode(NEEDLE.format(key=key), bos=False, eos=False)
    question = tokenizer.encode(QUESTION, bos=False, eos=False)
    answer = key_tokens(tokenizer, key)
    n_fill = length + 1 - 1 - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"passkey length {length} is too short for the key, its statement and the question")
    reps = (offset + n_fill) // len(filler) + 1
    fill = (filler * reps)[offset:offset + n_fill]
    at = round(depth * n_fill)
    seq = torch.tensor([tokenizer.bos_id, *fill[:at], *needle, *fill[at:], *question, *answer])
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    labels[-len(answer):] = seq[-len(answer):]
    return {"tokens": seq[:-1], "labels": labels, "positions": torch.arange(length),
            "document_ids": torch.zeros(length, dtype=torch.long)}


def filler_tokens(tokenizer: Tokenizer, texts: list[str] | None, need: int) -> list[int]:
    """The haystack text: `texts` (documents) concatenated until `need` tokens, or the fixed filler."""
    out: list[int] = []
    for text in texts or []:
        out += tokenizer.encode(text, bos=False, eos=False)
        if len(out) >= need:
            break
    return out or tokenizer.encode(FILLER * 8, bos=False, eos=False)


def trial_key(seed: int, length: int, depth: float, trial: int, digits: int) -> str:
    return str(random.Random(f"{seed}/{length}/{depth}/{trial}").randrange(10 ** digits)).zfill(digits)


class PasskeyProbe:
    def __init__(self, evaluator: Evaluator, texts: Iterator[str] | None):
        """`texts`: the validation corpus' documents for the haystacks (None: a fixed filler text)."""
        self.ev = evaluator
        cfg = evaluator.cfg
        self.pk, self.seed = cfg.passkey, cfg.debug.seed
        self.lengths, self.depths = parse_lengths(self.pk.lengths), parse_depths(self.pk.depths)
        self.tokenizer = load_tokenizer(cfg)
        self.filler = filler_tokens(self.tokenizer, texts, max(self.lengths))
        self.folder = Path(cfg.job.dump_folder) / "passkey"

    def trial(self, length: int, depth: float, t: int) -> dict[str, torch.Tensor]:
        key = trial_key(self.seed, length, depth, t, self.pk.digits)
        offset = (t * 7919) % len(self.filler)  # each trial a different stretch of the haystack text
        return make_trial(self.tokenizer, self.filler, length, depth, key, offset)

    @torch.no_grad()
    def cell(self, length: int, depth: float) -> float:
        """Accuracy over the trials of one (length, depth): dp ranks split them, cp ranks share each."""
        tr, ev = self.ev.trainer, self.ev
        dp, bs = tr.dims.dp, tr.cfg.validation.local_batch_size
        mine = list(range(ev.dp_rank, self.pk.trials, dp))
        per_rank = -(-self.pk.trials // dp)
        passed = torch.zeros(1, dtype=torch.float64, device=tr.device)
        for start in range(0, per_rank, bs):  # the same number of forwards on every rank
            samples = [self.trial(length, depth, t) for t in mine[start:start + bs]]
            while len(samples) < min(bs, per_rank - start):
                samples.append(_no_labels(length))
            b = tr._shard({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
            scored = b["labels"] != IGNORE_INDEX
            right = torch.zeros(2, len(samples), dtype=torch.float64, device=tr.device)  # correct, scored
            h = ev.hidden_states(b, document_masks=False)  # on every rank: cp and tp ranks exchange K/V
            if scored.any():  # the same on every tp rank (they hold the same tokens)
                pred = ev.logits(_rows(h, scored)).argmax(-1)
                sample = scored.nonzero()[:, 0]
                right[0].index_add_(0, sample, (pred == b["labels"][scored]).double())
                right[1].index_add_(0, sample, torch.ones_like(sample, dtype=torch.float64))
            dist.all_reduce(right, group=tr.meshes["cp"].get_group())
            passed += ((right[0] == right[1]) & (right[1] > 0)).sum()
        dist.all_reduce(passed, group=tr.meshes["dp"].get_group())
        return passed.item() / self.pk.trials

    def run(self, step: int) -> tuple[dict[str, dict[str, float]], bytes]:
        acc = {str(n): {_depth_key(d): self.cell(n, d) for d in self.depths} for n in self.lengths}
        png = heatmap_png(acc)
        if self.ev.trainer.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "accuracy": acc, "trials": self.pk.trials, "digits": self.pk.digits}
            (self.folder / "passkey.json").write_text(json.dumps(record, indent=2) + "\n")
            (self.folder / "passkey.png").write_bytes(png)
        return acc, png


def _depth_key(d: float) -> str:
    return f"{d:g}"


def _no_labels(length: int) -> dict[str, torch.Tensor]:
    return {k: v[0] for k, v in empty_batch(length).items()}


def _rows(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of h (B, S, dim) where mask (B, S) holds; a replicated DTensor stays one."""
    from torch.distributed.tensor import DTensor
    if isinstance(h, DTensor):
        return DTensor.from_local(h.to_local()[mask], h.device_mesh, h.placements, run_check=False)
    return h[mask]


# ---- the heatmap, as a PNG written with zlib alone ------------------------------------------

# 3 x 5 pixel glyphs for the labels: lengths (digits, K, M) and depths/accuracies (digits, ".").
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "K": "101110100110101",
    "M": "101111111101101", " ": "000000000000000",
}
SCALE, CELL_W, CELL_H = 2, 44, 22


def _short(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _colour(acc: float) -> tuple[int, int, int]:
    """Red (0) -> yellow (0.5) -> green (1)."""
    a = min(max(acc, 0.0), 1.0)
    return (int(215 * min(1.0, 2 * (1 - a))) + 30, int(190 * min(1.0, 2 * a)) + 30, 50)


def _text(img: list[bytearray], x: int, y: int, s: str, rgb: tuple[int, int, int] = (0, 0, 0)) -> None:
    for ch in s:
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for i, bit in enumerate(glyph):
            if bit == "1":
                for dy in range(SCALE):
                    for dx in range(SCALE):
                        px, py = x + (i % 3) * SCALE + dx, y + (i // 3) * SCALE + dy
                        if 0 <= py < len(img) and 0 <= px < len(img[0]) // 3:
                            img[py][3 * px:3 * px + 3] = bytes(rgb)
        x += 4 * SCALE


def heatmap_png(acc: dict[str, dict[str, float]]) -> bytes:
    """Lengths down, depths across, each cell coloured by accuracy and labelled with it; axis labels
    give the lengths (K = 1024 tokens) and the depths."""
    lengths, depths = list(acc), list(next(iter(acc.values())))
    left, top = 6 * 4 * SCALE, 5 * SCALE + 8
    width, height = left + CELL_W * len(depths) + 4, top + CELL_H * len(lengths) + 4
    img = [bytearray(b"\xff" * 3 * width) for _ in range(height)]
    for j, d in enumerate(depths):
        _text(img, left + j * CELL_W + 4, 3, d)
    for i, n in enumerate(lengths):
        y = top + i * CELL_H
        _text(img, 3, y + 6, _short(int(n)))
        for j, d in enumerate(depths):
            x, rgb = left + j * CELL_W, _colour(acc[n][d])
            for row in img[y + 1:y + CELL_H]:
                row[3 * (x + 1):3 * (x + CELL_W)] = bytes(rgb) * (CELL_W - 1)
            _text(img, x + 6, y + 6, f"{acc[n][d]:.2f}")
    return encode_png(img, width, height)


def encode_png(rows: list[bytearray], width: int, height: int) -> bytes:
    """8-bit RGB PNG of `rows` (each 3 x width bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + bytes(r) for r in rows)  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
