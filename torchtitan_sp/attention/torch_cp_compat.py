"""The private torch surfaces context parallelism relies on, in one version-guarded place.

What lives here and nowhere else:
- torch's ring-attention machinery (`_templated_ring_attention(_backward)`, `_cp_options`), in
  `experimental._context_parallel._attention` on torch 2.13, else in the older `experimental._attention`
  (the GPU machines' 2.11; whether 2.12 has the new module is unverified);
- the per-block SDPA kernels that return the log-sum-exp a ring needs. As shipped, torch's ring
  only knows the CUDA ops; on CPU the same ring runs on `_scaled_dot_product_flash_attention_for_cpu`
  (the CPU adapter). On CUDA the blocks use the cuDNN op (about 1.8x the flash op on H100), else flash.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

try:  # torch 2.13 (its experimental._attention is a stub that lacks _templated_ring_attention_backward)
    from torch.distributed.tensor.experimental._context_parallel import _attention as _cp
except ImportError:  # older torch without the new module
    from torch.distributed.tensor.experimental import _attention as _cp

TESTED_TORCH = ((2, 11), (2, 13))
_version = tuple(int(p) for p in torch.__version__.split(".")[:2])
if not TESTED_TORCH[0] <= _version <= TESTED_TORCH[1]:
    warnings.warn(f"torchtitan_sp context parallelism uses private torch APIs written for torch "
                  f"2.11..2.13 (tested on 2.11 and 2.13), not {torch.__version__}", stacklevel=2)

# Functional collectives renamed in 2.13 (the *_tensor names now warn); same signatures.
all_gather_single = getattr(funcol, "all_gather_single", funcol.all_gather_tensor)
reduce_scatter_single = getattr(funcol, "reduce_scatter_single", funcol.reduce_scatter_tensor)

templated_ring_attention = _cp._templated_ring_attention
templated_ring_attention_backward = _cp._templated_ring_attention_backward

ROTATE_METHODS = {"allgather": _cp._RotateMethod.ALL_GATHER, "alltoall": _cp._RotateMethod.ALL_TO_ALL}
aten = torch.ops.aten


@contextlib.contextmanager
def ring_options(rotate_method: str, load_balance: bool) -> Iterator[None]:
    """Set torch's global ring options for one call and restore them: they are process-wide in
    torch, while each of our attention modules carries its own."""
    opts = _cp._cp_options
    saved = (opts.rotate_method, opts.enable_load_balance)
    opts.rotate_method, opts.enable_load_balance = ROTATE_METHODS[rotate_method], load_balance
    try:
        yield
    finally:
        opts.rotate_method, opts.enable_load_balance = saved


def unflatten_mesh(mesh: DeviceMesh, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """View a 1-D mesh as an N-D one (e.g. cp -> ring x ulysses); private in torch 2.11..2.13."""
    return mesh._unflatten(0, sizes, names)


# Which CUDA block kernel the rings use; "flash" is the fallback where cuDNN SDPA is unavailable.
# Benchmark knob, read at import: TORCHTITAN_SP_CUDA_ATTN=flash forces flash (bench_cp_attention.py --kernel's default).
CUDA_BLOCK_KERNEL = os.environ.get("TORCHTITAN_SP_CUDA_ATTN", "cudnn")


def _cuda_kernel(any_length: bool) -> str:
    """cuDNN for the regular blocks of a ring. Blocks of any length (packed documents' pieces, down
    to one key) take flash: torch's own dispatch keeps cuDNN from key length 1 (pytorch#138529),
    and cuDNN builds and caches a graph per (Sq, Sk) pair, a new one for almost every piece."""
    if CUDA_BLOCK_KERNEL == "cudnn" and not any_length and torch.backends.cudnn.is_available():
        return "cudnn"
    return "flash"


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
             any_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention block: out (B, H, Sq, D) and lse (B, H, Sq) in fp32. k, v may have fewer heads
    (GQA: all three kernels take it natively, so K/V are never expanded); is_causal is top-left
    aligned (used only on square diagonal blocks). `any_length`: block sizes that vary per batch."""
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal)
        return out, lse.float()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if _cuda_kernel(any_length) == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False)[:2]
        return out, lse.reshape(out.shape[:3]).float()
    out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal)[:2]
    return out, lse.float()


def attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, is_causal: bool,
             any_length: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* (merged) out and lse of its query rows."""
    if q.device.type == "cpu":
        return tuple(aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    sq, sk = q.shape[2], k.shape[2]
    rng = torch.empty((), dtype=torch.int64, device=q.device)  # philox state: unused without dropout
    if _cuda_kernel(any_length) == "cudnn":
        return tuple(aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), rng, rng, None, None, None, sq, sk, 0.0, is_causal))
    return tuple(aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, sq, sk, 0.0, is_causal, rng, rng))


def ring_block_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   is_causal: bool, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """`op` for torch's _templated_ring_attention (which calls it with keyword options)."""
    return attn_fwd(query, key, value, is_causal)


def ring_block_bwd(*, grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   out: torch.Tensor, logsumexp: torch.Tensor, is_causal: bool,
                   **_: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`op` for torch's _templated_ring_attention_backward."""
    return attn_bwd(grad_out, query, key, value, out, logsumexp, is_causal)
