"""Sample layouts: packed windows over a stream of documents, or one padded document per sample.

Every document is tokenized as BOS ... EOS. A label whose target lies in another document (the
EOS -> next BOS prediction, or a window's last label when a document starts there) is ignored:
attention is document-causal, so nothing could predict it but the fixed EOS -> BOS rule.

A document may come with targets: one per token, the token itself or IGNORE_INDEX where it is not
to be predicted (a chat prompt, a pre-tokenized record's -100 labels); without, every token is one.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from torchtitan_sp.attention.sharding import IGNORE_INDEX


def empty_batch(seq_len: int) -> dict[str, torch.Tensor]:
    """A sample with no valid label: what a rank whose data ended runs while others still have some."""
    zeros = torch.zeros(1, seq_len, dtype=torch.long)
    return {"tokens": zeros, "labels": torch.full_like(zeros, IGNORE_INDEX),
            "positions": torch.arange(seq_len)[None], "document_ids": zeros}


def window_sample(window: list[int], runs: list[int], targets: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A packed sample from seq_len + 1 stream tokens; `runs` are the lengths of the document
    pieces in the window, `targets` the tokens' targets (default: the tokens). Positions restart
    at 0 where each piece starts, so a document continued from the previous window counts from 0
    again (it cannot see its earlier part anyway)."""
    w, ends = torch.tensor(window, dtype=torch.long), torch.tensor(runs, dtype=torch.long).cumsum(0)
    t = w if targets is None else torch.tensor(targets, dtype=torch.long)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
    doc = torch.zeros(len(window), dtype=torch.long).index_fill_(0, starts[1:], 1).cumsum(0)
    pos = torch.arange(len(window)) - starts[doc]
    labels = torch.where(doc[1:] == doc[:-1], t[1:], IGNORE_INDEX)
    return {"tokens": w[:-1], "labels": labels, "positions": pos[:-1], "document_ids": doc[:-1]}


def padded_sample(doc: list[int], seq_len: int, pad_id: int, targets: list[int] | None = None
                  ) -> dict[str, torch.Tensor]:
    """One document (BOS ... EOS) truncated to seq_len + 1 tokens or padded: padding has ignored
    labels, continuing positions and a document id of its own."""
    w = torch.tensor(doc[:seq_len + 1], dtype=torch.long)
    t = w if targets is None else torch.tensor(targets[:seq_len + 1], dtype=torch.long)
    n, pad = len(w) - 1, seq_len + 1 - len(w)
    return {"tokens": torch.cat([w[:-1], torch.full((pad,), pad_id)]),
            "labels": torch.cat([t[1:], torch.full((pad,), IGNORE_INDEX)]),
            "positions": torch.arange(seq_len),
            "document_ids": torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(pad, dtype=torch.long)])}


class Packer:
    """Cuts a stream of tokenized documents into windows of seq_len + 1 tokens that overlap by one:
    a window's last token is the next window's first, so every stream token is an input exactly
    once and every next-token pair lies in exactly one window.

    Each document comes with a key (its corpus cursor); `head` and `offset` name the first token
    the next window starts with, which is all a resume needs (re-tokenize, skip `offset`)."""

    def __init__(self, seq_len: int, offset: int = 0):
        self.seq_len = seq_len
        self.segments: deque[tuple[Any, list[int], list[int] | None]] = deque()
        self.offset = offset  # tokens of segments[0] already behind the next window
        self.pending = -offset

    def add(self, key: Any, tokens: list[int], targets: list[int] | None = None) -> None:
        self.segments.append((key, tokens, targets))
        self.pending += len(tokens)

    def full(self) -> bool:
        return self.pending >= self.seq_len + 1

    @property
    def head(self) -> Any:
        return self.segments[0][0]

    def pop(self) -> dict[str, torch.Tensor]:
        need, window, targets, runs, off = self.seq_len + 1, [], [], [], self.offset
        for _, tokens, doc_targets in self.segments:
            end = off + need - len(window)
            piece = tokens[off:end]
            window += piece
            targets += piece if doc_targets is None else doc_targets[off:end]
            runs.append(len(piece))
            off = 0
            if len(window) == need:
                break
        self.offset += self.seq_len
        self.pending -= self.seq_len
        while self.offset >= len(self.segments[0][1]):
            self.offset -= len(self.segments.popleft()[1])
        return window_sample(window, runs, targets)
