"""Cost of building the document-causal FlexAttention BlockMask, eager create_block_mask vs the
compiled one torchtitan_sp uses (attention/local.py), each in a fresh process:

    python scripts/bench_block_mask.py [--seq 32768] [--modes eager,compiled] [--out bench.json]

Prints seconds for the first build (compile included) and a second build with new documents, and
peak memory: max RSS on CPU, torch.cuda.max_memory_allocated on a GPU. Documents average 500 tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(mode: str, seq: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask

    from torchtitan_sp.attention.local import document_block_mask
    device = "cuda" if torch.cuda.is_available() else "cpu"
    times = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        starts = torch.rand(1, seq, generator=gen) < 1 / 500
        starts[:, 0] = True
        docs = (starts.cumsum(1) - 1).to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

        t0 = time.perf_counter()
        mask = (document_block_mask(docs) if mode == "compiled"
                else create_block_mask(mask_mod, 1, None, seq, seq, device=device))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "seq": seq, "device": device, "first_s": round(times[0], 2), "second_s": round(times[1], 3),
            "peak_gib": round(peak / 2**30, 2), "blocks": int(mask.kv_num_blocks.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(build(args.child, args.seq)))
        return
    results = []
    for mode in args.modes.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--seq", str(args.seq)],
                           capture_output=True, text=True)
        line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
        result = json.loads(line) if line else {"mode": mode, "seq": args.seq, "error": r.stderr.strip()[-300:]}
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
