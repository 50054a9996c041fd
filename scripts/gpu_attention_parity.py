"""The local attention's CUDA paths (cuDNN-first SDPA; FlexAttention with a document BlockMask) vs
fp32 SDPA with an explicit mask, forward and backward, bf16 and fp32. Writes JSON to --out.
(The ring's CUDA block kernels are checked against full attention by scripts/bench_cp_attention.py.)"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from torchtitan_sp.attention.local import LocalAttention
from torchtitan_sp.attention.reference import attention_mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(dtype: torch.dtype, seq: int, docs: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, h, seq, 128, device="cuda", dtype=dtype, generator=g) for h in (32, 8, 8, 32))
    doc_ids = (torch.arange(seq, device="cuda") // (seq // 5))[None] if docs else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = LocalAttention()(q, k, v, doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), do)
    mask = attention_mask(seq, doc_ids.cpu() if docs else None).cuda()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    return {"dtype": str(dtype), "seq": seq, "documents": docs, "out": rel(out, ref),
            **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", grads, ref_grads)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="parity.json")
    args = ap.parse_args()
    results = [check(dt, 4096, docs) for dt in (torch.bfloat16, torch.float32) for docs in (False, True)]
    for r in results:
        r["ok"] = max(r["out"], r["dq"], r["dk"], r["dv"]) < (2e-2 if "bfloat16" in r["dtype"] else 1e-3)
        print(json.dumps(r), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
