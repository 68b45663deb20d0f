"""The memory a training step takes: the activations autograd saves for backward, counted exactly.

:class:`SavedActivations` is a ``torch.autograd.graph.saved_tensors_hooks`` context: every tensor that the forward
pass inside it saves for backward passes through its pack hook, which notes the tensor's storage and hands the
tensor back unchanged (so the step computes what it computes without it; no copy, no host-device sync). Storages
are counted once however many ops save views of them (attention's q, k and v are views of one qkv tensor), and
the parameters' own storages are left out: what remains is the memory that grows with the batch and the tokens, the
part token reduction saves. It counts on CPU as on CUDA, under AMP (autocast's low-precision copies of the weights
are counted: they are held for backward too) and around a compiled model (its graph saves through the same hook).
A block under activation checkpointing saves through its own hooks and is not counted.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Set

import torch

MIB = float(2**20)


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Count the bytes of the tensors saved for backward in the block: ``with SavedActivations(model.parameters())
    as saved: loss = ...``; then ``saved.mib``. Only the forward needs to run inside it: the unpack hook travels
    with each saved tensor, so ``backward()`` may run after the block has closed."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._skip: Set[int] = {_storage_key(p) for p in parameters if _storage_key(p) is not None}
        self._seen: Dict[Any, int] = {}
        super().__init__(self._pack, _unpack)

    def __enter__(self) -> "SavedActivations":
        super().__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None and key not in self._skip and key not in self._seen:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def mib(self) -> float:
        return self.bytes / MIB


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_key(tensor: torch.Tensor) -> Optional[Any]:
    """(device, address) of the tensor's storage; ``None`` for tensors without one (a compiled graph's fakes)."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()) if storage.nbytes() else None
    except (RuntimeError, NotImplementedError):
        return None


def cuda_peak_mib(device: torch.device) -> Optional[float]:
    """The most memory the CUDA caching allocator has held for tensors on ``device`` since the last
    :func:`reset_cuda_peak` (parameters, optimizer state and activations together); ``None`` off CUDA. A host-side
    counter: reading it does not wait for the device."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / MIB


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
