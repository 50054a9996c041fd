"""Data: every source yields dicts of (seq_len,) LongTensors `tokens`, `labels` (already shifted,
-100 = ignored), `positions` (RoPE positions, restarting per packed document) and `document_ids`.
Batches are (B, seq_len); context-parallel sharding happens later, in the train step."""

from __future__ import annotations

from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_sp.config import Config
from torchtitan_sp.data.synthetic import SyntheticTokens


def build_dataloader(cfg: Config, vocab_size: int, dp_rank: int, dp_size: int) -> StatefulDataLoader:
    """A resumable loader of this data-parallel rank's batches (cp and tp ranks get the same ones)."""
    t = cfg.training
    if t.dataset == "synthetic":
        ds = SyntheticTokens(vocab_size, t.seq_len, cfg.debug.seed, dp_rank, dp_size)
    else:
        from torchtitan_sp.data.sources import build_dataset  # the real-data path (tokenizer, packing, mixtures)
        ds = build_dataset(cfg, dp_rank, dp_size)
    return StatefulDataLoader(ds, batch_size=t.local_batch_size, num_workers=0)
