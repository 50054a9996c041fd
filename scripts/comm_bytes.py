"""Bytes each cp rank sends per layer for every strategy, counted from the real collectives.

Runs the strategies on P CPU processes (gloo) with the Llama-3-8B attention shape (h=32, h_kv=8,
head_dim=128) at a small sequence length, counts what every collective sends
(torchtitan_sp.attention.comm_count), and scales linearly to the target length: every term of the
traffic is proportional to S (the counts are exact at the small S; the tests check them against
the formulas there). Counted in fp32 on CPU, reported in elements and in bf16 MiB.

    python scripts/comm_bytes.py                      # S=131072, P=8, measured at S=1024
    python scripts/comm_bytes.py --cp 4 --measure-seq-len 512
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from torchtitan_sp.attention import build_cp_attention  # noqa: E402
from torchtitan_sp.attention.comm_count import CommCounter, formula_elements  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _setups(cp: int) -> list[tuple[str, dict]]:
    out = [("ring (allgather rotate)", dict(strategy="ring", rotate_method="allgather")),
           ("ring (alltoall rotate)", dict(strategy="ring", rotate_method="alltoall")),
           ("ulysses", dict(strategy="ulysses"))]
    for u in (2, 4):
        if cp % u == 0 and cp // u > 1:
            out.append((f"usp u={u} x r={cp // u}", dict(strategy="usp", ulysses_degree=u)))
    out += [("allgather stride 1", dict(strategy="allgather", heads_k_stride=1)),
            ("allgather stride 8", dict(strategy="allgather", heads_k_stride=8))]
    return out


def _worker(rank: int, cp: int, port: int, seq_len: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cp, timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    gen = torch.Generator().manual_seed(rank)
    local = seq_len // cp
    rows = {}
    for name, kwargs in _setups(cp):
        kwargs = dict(kwargs)
        attn = build_cp_attention(kwargs.pop("strategy"), mesh, load_balance=True, n_heads=HEADS,
                                  n_kv_heads=KV_HEADS, **kwargs)
        q = torch.randn(1, HEADS, local, HEAD_DIM, generator=gen, requires_grad=True)
        k, v = (torch.randn(1, KV_HEADS, local, HEAD_DIM, generator=gen, requires_grad=True) for _ in range(2))
        with CommCounter() as fwd:
            out = attn(q, k, v)
        with CommCounter() as bwd:
            out.backward(torch.ones_like(out))
        rows[name] = (fwd.total_bytes() // 4, bwd.total_bytes() // 4)  # fp32 -> elements
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--cp", type=int, default=8)
    p.add_argument("--measure-seq-len", type=int, default=1024)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, args.cp, port, args.measure_seq_len, queue)) for r in range(args.cp)]
    for proc in procs:
        proc.start()
    rows = queue.get()
    for proc in procs:
        proc.join()

    scale = args.seq_len / args.measure_seq_len
    d, dkv, s, cp = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, args.seq_len, args.cp
    print(f"Llama-3-8B attention (d={d}, h={HEADS}, h_kv={KV_HEADS}, head_dim={HEAD_DIM}), S={s}, P={cp}: "
          f"elements each rank sends per layer, counted at S={args.measure_seq_len} x {scale:g}")
    print(f"{'strategy':24} {'fwd Melem':>10} {'formula':>10} {'fwd MiB bf16':>13} {'bwd Melem':>10}")
    for name, kwargs in _setups(cp):
        fwd, bwd = (x * scale / 1e6 for x in rows[name])
        formula = formula_elements(kwargs["strategy"], d, dkv, s, cp, kwargs.get("ulysses_degree", 1)) / 1e6
        print(f"{name:24} {fwd:10.2f} {formula:10.2f} {fwd * 2e6 / 2**20:13.1f} {bwd:10.2f}")
    print("backward elements: ring/usp rotate K/V again and pass dK/dV P times around the ring in fp32 (torch"
          " accumulates in fp32); allgather gathers K/V again and reduce-scatters dK/dV in fp32; ulysses"
          " repeats its two all-to-alls.")


if __name__ == "__main__":
    main()
