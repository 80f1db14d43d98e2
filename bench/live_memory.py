"""The peak bytes of the tensors that torch ops create, counted op by op (a TorchDispatchMode).

CPU tensors have no allocator statistics, so the bench scripts count: every op's outputs are recorded with a
weak reference to their storage, and after each op the storages still alive are summed. Autograd's saved
tensors, the recomputation of checkpointed layers and collectives' outputs are all ops, so the peak is the
one a GPU's allocator would see, less its rounding and cache.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """Inside `with PeakLiveBytes() as m:`, `m.peak` is the most bytes that tensors created in the block held at
    once. `m.forget(t)` leaves a tensor's storage out (a host copy of an offloaded activation, say)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.forgotten: dict[int, StorageWeakRef] = {}
        self.current = 0
        self.peak = 0

    def forget(self, tensor: torch.Tensor) -> None:
        ref = StorageWeakRef(tensor.untyped_storage())
        entry = self.live.pop(ref.cdata, None)
        if entry is not None:
            self.current -= entry[1]
        self.forgotten[ref.cdata] = ref

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **kwargs)
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for key, ref in list(self.forgotten.items()):
            if ref.expired():
                del self.forgotten[key]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                new = ref.cdata not in inputs and ref.cdata not in self.live  # not a view, not in place
                if new and ref.cdata not in self.forgotten and storage.nbytes():
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out
