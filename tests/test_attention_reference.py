"""The single-process oracles agree with torch SDPA and with each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan_sp.attention.reference import attention_mask, full_attention, ring_attention


def _qkv(h: int = 4, hkv: int = 4, s: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, s, 8, generator=gen) for n in (h, hkv, hkv, h)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2)])
def test_full_attention_is_causal_sdpa(h: int, hkv: int) -> None:
    q, k, v, _ = _qkv(h, hkv)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != hkv)
    assert _rel(full_attention(q, k, v), ref) <= 1e-6


def test_document_mask_is_attention_per_document() -> None:
    q, k, v, _ = _qkv()
    docs = torch.tensor([[0] * 5 + [1] * 20 + [2] * 7, [0] * 32])
    out = full_attention(q, k, v, docs)
    assert attention_mask(32, docs).shape == (2, 1, 32, 32)
    for b in range(2):
        for d in docs[b].unique():
            idx = (docs[b] == d).nonzero().squeeze(1)
            alone = F.scaled_dot_product_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx],
                                                   is_causal=True)
            assert _rel(out[b:b + 1, :, idx], alone) <= 1e-6


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("headtail", [True, False])
def test_ring_oracle_matches_autograd(cp_size: int, headtail: bool) -> None:
    q, k, v, dout = _qkv()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True)
    ref.backward(dout)
    got = ring_attention(q, k, v, dout, cp_size, headtail)
    for a, b in zip(got, [ref.detach()] + [t.grad for t in leaves]):
        assert _rel(a, b) <= 1e-5
