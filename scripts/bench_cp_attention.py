"""Ring-attention compute efficiency on one device: P ranks emulated in one process.

Each emulated rank runs the step schedule of torch's ring (strategy `ring`; head-tail or contiguous),
with the block kernels the real path uses (torch_cp_compat.attn_fwd/attn_bwd: cuDNN or flash SDPA on
CUDA, the flash CPU op on CPU) and the same fp32 log-sum-exp merge, so its time is the attention
compute of one rank of a real ring without the communication. Reported: per-rank attention TFLOP/s
(useful causal FLOPs / P over the slowest rank's time) next to full-sequence causal attention on the
same device, and the K/V bytes each rank receives per layer next to 2*d_kv*S*(P-1)/P*bytes.

    python scripts/bench_cp_attention.py                  # GPU: S=131072, P=4 and 8, Llama-3-8B heads
    python scripts/bench_cp_attention.py --small --cpu    # smoke test
Results go to --out, else $OUT/bench_cp_attention.json, else ./bench_cp_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from torchtitan_sp.attention import torch_cp_compat as compat  # noqa: E402


def _schedule(rank: int, cp: int, balance: bool) -> list[tuple[int, str]]:
    """(source rank, block kind) per step, as torch's _templated_ring_attention decides them."""
    steps = [(rank, "diag")]
    for i in range(1, cp):
        src = (rank - i) % cp
        if balance:
            steps.append((src, "kv_head" if i <= rank else "q_tail"))
        elif src < rank:
            steps.append((src, "full"))
    return steps


def _slices(kind: str, n: int) -> tuple[slice, slice]:
    """(query rows, key rows) a step uses out of the local n."""
    half = n // 2
    return {"diag": (slice(0, n), slice(0, n)), "full": (slice(0, n), slice(0, n)),
            "kv_head": (slice(0, n), slice(0, half)), "q_tail": (slice(half, n), slice(0, n))}[kind]


def _merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor, rows: slice) -> None:
    """In-place fp32 merge into rows of the running (out, lse): torch's sigmoid form."""
    a, b = out[:, :, rows], lse[:, :, rows]
    out[:, :, rows] = a - torch.sigmoid(l - b)[..., None] * (a - o.float())
    lse[:, :, rows] = b - torch.nn.functional.logsigmoid(b - l)


def ring_rank(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], dout: torch.Tensor,
              rank: int, balance: bool, backward: bool):
    """One rank's ring forward (and backward): q, dout local; ks/vs every rank's local K/V."""
    n = q.shape[2]
    steps = _schedule(rank, len(ks), balance)
    out, lse = compat.attn_fwd(q, ks[rank], vs[rank], True)  # step 0: the diagonal block
    out = out.float()
    for src, kind in steps[1:]:
        qr, kr = _slices(kind, n)
        o, l = compat.attn_fwd(q[:, :, qr], ks[src][:, :, kr], vs[src][:, :, kr], False)
        _merge(out, lse, o, l, qr)
    out = out.to(q.dtype)
    if not backward:
        return out, None
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = {}
    for src, kind in steps:
        qr, kr = _slices(kind, n)
        dq_, dk_, dv_ = compat.attn_bwd(dout[:, :, qr], q[:, :, qr], ks[src][:, :, kr], vs[src][:, :, kr],
                                        out[:, :, qr], lse[:, :, qr].contiguous(), kind == "diag")
        dq[:, :, qr] += dq_
        dkv[src] = (kr, dk_, dv_)
    return out, (dq, dkv)


def _time(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (kernel selection, cuDNN plans)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def check(args, device: torch.device, dtype: torch.dtype, seq_len: int, cp: int, balance: bool) -> dict:
    """Emulated ring (all ranks) vs full causal attention through F.scaled_dot_product_attention."""
    from torchtitan_sp.attention.sharding import shard_indices
    gen = torch.Generator(device=device).manual_seed(0)
    q, dout = (torch.randn(args.batch, args.heads, seq_len, args.head_dim, device=device, dtype=dtype, generator=gen)
               for _ in range(2))
    k, v = (torch.randn(args.batch, args.kv_heads, seq_len, args.head_dim, device=device, dtype=dtype,
                        generator=gen) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True,
                                                           enable_gqa=args.heads != args.kv_heads)
    ref.backward(dout)
    idx = [shard_indices(seq_len, r, cp, balance, device) for r in range(cp)]
    ks, vs = [k[:, :, i] for i in idx], [v[:, :, i] for i in idx]
    out, dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, q, k, v))
    for r in range(cp):
        o, (dq_r, dkv) = ring_rank(q[:, :, idx[r]], ks, vs, dout[:, :, idx[r]], r, balance, True)
        out[:, :, idx[r]], dq[:, :, idx[r]] = o.float(), dq_r
        for src, (kr, dk_, dv_) in dkv.items():
            rows = idx[src][kr]
            dk[:, :, rows] += dk_.float()
            dv[:, :, rows] += dv_.float()
    rel = lambda a, b: ((a - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
    return {"seq_len": seq_len, "cp": cp, "headtail": balance, "out": rel(out, ref), "dq": rel(dq, leaves[0].grad),
            "dk": rel(dk, leaves[1].grad), "dv": rel(dv, leaves[2].grad)}


def bench(args, device: torch.device, dtype: torch.dtype, cp: int, balance: bool) -> dict:
    b, h, hkv, d, s = args.batch, args.heads, args.kv_heads, args.head_dim, args.seq_len
    n = s // cp
    mk = lambda heads, length: torch.randn(b, heads, length, d, device=device, dtype=dtype)  # noqa: E731
    ks, vs = [mk(hkv, n) for _ in range(cp)], [mk(hkv, n) for _ in range(cp)]
    q, dout = mk(h, n), mk(h, n)
    fwd_flops = 2 * b * h * s * s * d  # causal: half of 4*b*h*s*s*d
    res = {"cp": cp, "headtail": balance, "rank_fwd_s": [], "rank_fwd_bwd_s": []}
    for rank in range(cp):
        res["rank_fwd_s"].append(_time(lambda: ring_rank(q, ks, vs, dout, rank, balance, False), device, args.reps))
        res["rank_fwd_bwd_s"].append(_time(lambda: ring_rank(q, ks, vs, dout, rank, balance, True), device, args.reps))
    for key, flops in (("fwd", fwd_flops), ("fwd_bwd", 3.5 * fwd_flops)):  # backward = 2.5 x forward
        slowest = max(res[f"rank_{key}_s"])
        res[f"tflops_per_rank_{key}"] = flops / cp / slowest / 1e12
        res[f"imbalance_{key}"] = slowest / min(res[f"rank_{key}_s"])
    elem = torch.empty((), dtype=dtype).element_size()
    received = sum(2 * ks[src].numel() * elem for src in range(cp) if src != 0)  # rank 0 receives the others' K/V
    res["kv_bytes_per_rank_per_layer"] = received
    res["kv_bytes_formula"] = 2 * (hkv * d) * s * (cp - 1) // cp * b * elem
    return res


def full_sequence(args, device: torch.device, dtype: torch.dtype) -> dict:
    b, h, hkv, d, s = args.batch, args.heads, args.kv_heads, args.head_dim, args.seq_len
    q, dout = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, device=device, dtype=dtype) for _ in range(2))
    fwd_flops = 2 * b * h * s * s * d

    def fwd_bwd():
        out, lse = compat.attn_fwd(q, k, v, True)
        compat.attn_bwd(dout, q, k, v, out, lse, True)
    t_fwd = _time(lambda: compat.attn_fwd(q, k, v, True), device, args.reps)
    t_all = _time(fwd_bwd, device, args.reps)
    return {"fwd_s": t_fwd, "fwd_bwd_s": t_all, "tflops_fwd": fwd_flops / t_fwd / 1e12,
            "tflops_fwd_bwd": 3.5 * fwd_flops / t_all / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on CPU (fp32)")
    p.add_argument("--small", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--cp", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kernel", choices=["cudnn", "flash"], default=compat.CUDA_BLOCK_KERNEL,
                   help="CUDA block kernel (the ring's TORCHTITAN_SP_CUDA_ATTN)")
    p.add_argument("--check-seq-len", type=int, default=16384, help="S of the correctness check (0: skip)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.small:
        args.seq_len, args.heads, args.kv_heads, args.head_dim, args.reps = 512, 4, 2, 32, 2
        args.cp, args.check_seq_len = [2, 4], 256
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    compat.CUDA_BLOCK_KERNEL = args.kernel
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "dtype": str(dtype),
              "kernel": args.kernel if device.type == "cuda" else "flash_cpu",
              "shape": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                        "head_dim": args.head_dim, "seq_len": args.seq_len}, "checks": [], "ring": []}
    print(f"{name} torch {torch.__version__} {dtype} kernel={result['kernel']} S={args.seq_len} "
          f"h={args.heads} h_kv={args.kv_heads} d_h={args.head_dim}", flush=True)
    if args.check_seq_len:
        for cp in args.cp:
            for balance in (True, False):
                c = check(args, device, dtype, args.check_seq_len, cp, balance)
                result["checks"].append(c)
                print(f"check S={c['seq_len']} P={cp} headtail={balance}: rel err out {c['out']:.1e} "
                      f"dq {c['dq']:.1e} dk {c['dk']:.1e} dv {c['dv']:.1e}", flush=True)
    full = full_sequence(args, device, dtype)
    result["full_sequence"] = full
    print(f"full-sequence causal attention: fwd {full['tflops_fwd']:.3g} TFLOP/s, "
          f"fwd+bwd {full['tflops_fwd_bwd']:.3g} TFLOP/s", flush=True)
    for cp in args.cp:
        for balance in (True, False):
            r = bench(args, device, dtype, cp, balance)
            result["ring"].append(r)
            print(f"ring P={cp} headtail={balance!s:5}: per-rank fwd {r['tflops_per_rank_fwd']:.3g} TFLOP/s, "
                  f"fwd+bwd {r['tflops_per_rank_fwd_bwd']:.3g} TFLOP/s (slowest/fastest rank "
                  f"{r['imbalance_fwd_bwd']:.2f}); K/V bytes per rank per layer {r['kv_bytes_per_rank_per_layer']:,} "
                  f"(formula {r['kv_bytes_formula']:,})", flush=True)
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "bench_cp_attention.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
