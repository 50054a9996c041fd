"""A learnable synthetic token stream: each next token is the current one plus one of four fixed
random offsets (mod vocab).

Every token has four equally likely successors, so a model's loss falls from ln(vocab) towards
ln(4) in a few dozen steps; the stream is a cumulative sum, so even 1M-token samples are cheap.
Sample i is drawn from a generator seeded by (seed, i), so the stream is the same whatever the
number of ranks; rank r of d reads samples r, r + d, r + 2d, ...
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset


class SyntheticTokens(IterableDataset):
    def __init__(self, vocab_size: int, seq_len: int, seed: int, dp_rank: int, dp_size: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(1, vocab_size, (4,), generator=g)
        self.next_index = dp_rank  # global index of the next sample this rank yields

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + index + 1)
        start = torch.randint(0, self.vocab_size, (1,), generator=g)
        steps = self.offsets[torch.randint(0, 4, (self.seq_len,), generator=g)]
        toks = torch.cat([start, start + steps.cumsum(0)]) % self.vocab_size
        return {"tokens": toks[:-1], "labels": toks[1:],  # labels shifted before any sharding
                "positions": torch.arange(self.seq_len), "document_ids": torch.zeros(self.seq_len, dtype=torch.long)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            index = self.next_index
            self.next_index += self.dp_size
            yield self.sample(index)

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_index = state["next_index"]
