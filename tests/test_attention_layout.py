"""The token orders around the Ulysses all-to-all, and the USP claim that they suit the ring."""

from __future__ import annotations

import pytest
import torch

from torchtitan_sp.attention.sharding import shard_indices
from torchtitan_sp.attention.ulysses import exchange_order, layout_indices, reorder_index


@pytest.mark.parametrize("cp,u", [(2, 2), (4, 2), (4, 4), (8, 2), (8, 4), (8, 1), (16, 8)])
@pytest.mark.parametrize("headtail", [True, False])
def test_ulysses_group_holds_a_ring_shard(cp: int, u: int, headtail: bool) -> None:
    """Ulysses group g of a cp = u x r layout holds exactly ring rank g's shard of the r-rank layout
    (same tokens, so the ring's causal schedule for r ranks applies), and exchange_order maps one
    order onto the other."""
    seq_len, r = 4 * cp, cp // u
    for g in range(r):
        gathered = layout_indices(seq_len, range(g * u, (g + 1) * u), cp, headtail)
        target = shard_indices(seq_len, g, r, headtail)
        assert sorted(gathered.tolist()) == sorted(target.tolist())
        to_target, from_target = exchange_order(seq_len, u, g, r, headtail, torch.device("cpu"))
        assert torch.equal(gathered[to_target], target)
        assert torch.equal(gathered[to_target][from_target], gathered)
        if not headtail:  # the exchange skips the reordering copy for contiguous layouts
            assert torch.equal(gathered, target)


def test_reorder_index() -> None:
    src, dst = torch.tensor([5, 1, 9, 3]), torch.tensor([9, 3, 5, 1])
    assert torch.equal(src[reorder_index(src, dst)], dst)
