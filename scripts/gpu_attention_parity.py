"""The local attention's CUDA paths (cuDNN-first SDPA; FlexAttention with a document BlockMask) and
the allgather strategy's document pieces (one rank, bf16) vs fp32 SDPA with an explicit mask, forward
and backward. Writes JSON to --out.
(The ring's CUDA block kernels are checked against full attention by scripts/bench_cp_attention.py.)"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from torchtitan_sp.attention.allgather import AllGatherAttention
from torchtitan_sp.attention.local import LocalAttention
from torchtitan_sp.attention.reference import attention_mask
from torchtitan_sp.train import CUDA_SDPA_PRIORITY


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(dtype: torch.dtype, seq: int, docs: bool, strategy: str = "local") -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, h, seq, 128, device="cuda", dtype=dtype, generator=g) for h in (32, 8, 8, 32))
    doc_ids = None
    if docs and strategy == "allgather":  # irregular documents, down to single tokens
        starts = torch.rand(seq, device="cuda", generator=g) < 1 / 300
        starts[[0, 5, 6, 7, 100]] = True
        doc_ids = (starts.cumsum(0) - 1)[None]
    elif docs:  # five equal documents
        doc_ids = (torch.arange(seq, device="cuda") // (seq // 5))[None]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if strategy == "allgather":  # one cp rank: head-tail runs (cuDNN), cut at document starts (flash)
        out = AllGatherAttention(dist.group.WORLD, load_balance=True, heads_k_stride=2)(q, k, v, doc_ids)
    else:
        out = LocalAttention()(q, k, v, doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), do)
    mask = attention_mask(seq, doc_ids.cpu() if docs else None).cuda()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    return {"strategy": strategy, "dtype": str(dtype), "seq": seq, "documents": docs, "out": rel(out, ref),
            **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", grads, ref_grads)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="parity.json")
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl")
    cases = [(dt, docs, "local") for dt in (torch.bfloat16, torch.float32) for docs in (False, True)]
    cases += [(torch.bfloat16, docs, "allgather") for docs in (False, True)]
    results = []
    for dtype, docs, strategy in cases:
        try:
            with sdpa_kernel(CUDA_SDPA_PRIORITY, set_priority=True):  # the trainer's kernel order
                r = check(dtype, 4096, docs, strategy)
            r["ok"] = max(r["out"], r["dq"], r["dk"], r["dv"]) < (2e-2 if "bfloat16" in r["dtype"] else 1e-3)
        except Exception as e:  # keep the other cases' results
            r = {"strategy": strategy, "dtype": str(dtype), "documents": docs, "ok": False, "error": repr(e)[:500]}
        print(json.dumps(r), flush=True)
        results.append(r)
        with open(args.out, "w") as f:  # after every case: a call cut short still returns what ran
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
