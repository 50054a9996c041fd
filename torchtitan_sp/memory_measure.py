"""Measured memory where torch keeps no allocator statistics (CPU): the peak of live tensor bytes,
against which tests and scripts/bench_memory.py check the estimator."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages on CPU, where torch has no allocator statistics.

    Every storage an op returns is tracked (weakly) from then on; after each op the live total is
    the sum of the tracked storages' current sizes (FSDP2 frees and re-allocates its unsharded
    parameters by resizing storages in place). Storages made before entering must be added with
    `track` (e.g. the parameters); DTensors count by their local tensor (ops on DTensors are slow
    under a Python mode, so keep e.g. FSDP's optimizer step outside). Memory an op allocates and
    frees internally is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, weakref.ref] = {}
        self.peak = 0

    def track(self, *tensors: Any) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, DTensor):
                t = t._local_tensor
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse:
                st = t.untyped_storage()
                key = id(st)
                if key not in self._storages:
                    self._storages[key] = weakref.ref(st, lambda _, key=key: self._storages.pop(key, None))

    @property
    def live(self) -> int:
        return sum(st.nbytes() for ref in list(self._storages.values()) if (st := ref()) is not None)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.track(out)
        self.peak = max(self.peak, self.live)
        return out
