"""Spikes saved for backward as 1-byte tensors.

Convolutions, pooling and matrix products save their inputs for the backward pass. When those
inputs are spikes (exact 0.0 / 1.0 values), :func:`spike_storage` keeps them as ``uint8`` (a
quarter of float32) and restores them exactly when backward needs them. Spike tensors are
registered with :func:`mark_spikes` by the layers that produce them; views of a registered
tensor are stored once, however many layers save them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch

__all__ = ["mark_spikes", "observing_saved_tensors", "spike_storage", "storing_spikes"]


class _Packed(NamedTuple):
    """A saved view of a spike tensor: the tensor's whole storage as uint8, and the view."""

    data: torch.Tensor
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _SpikeStore:
    """The spike tensors of one forward pass (by storage address) and their uint8 copies."""

    def __init__(self) -> None:
        self._spikes: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor | None]] = {}

    def mark(self, spikes: torch.Tensor) -> None:
        base = spikes if spikes._base is None else spikes._base  # views keep their base alive
        storage = base.untyped_storage()
        if storage.nbytes() == base.numel() * base.element_size():  # the storage is its own
            self._spikes[storage.data_ptr()] = (weakref.ref(base), None)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Packed:
        packed = self._pack(tensor)
        observe = _observer.get()
        if observe is not None:
            observe(packed.data if isinstance(packed, _Packed) else packed)
        return packed

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Packed:
        pointer = tensor.untyped_storage().data_ptr()
        ref, data = self._spikes.get(pointer, (None, None))
        spikes = ref() if ref is not None else None
        if spikes is None or spikes.dtype != tensor.dtype or spikes._version:
            return tensor
        if data is None:
            data = spikes.as_strided((spikes.numel(),), (1,), 0).to(torch.uint8)
            self._spikes[pointer] = (ref, data)
        size, stride, offset = tensor.size(), tensor.stride(), tensor.storage_offset()
        return _Packed(data, tensor.dtype, size, stride, offset)


def _unpack(packed: torch.Tensor | _Packed) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    return packed.data.to(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)


_active: ContextVar[_SpikeStore | None] = ContextVar("statten_spike_store", default=None)
_observer: ContextVar[Callable[[torch.Tensor], None] | None] = ContextVar(
    "statten_saved_tensor_observer", default=None
)


@contextlib.contextmanager
def observing_saved_tensors(observe: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """In this block ``observe`` sees every tensor saved for backward, as it is kept.

    Spikes are seen as their uint8 copies: :func:`spike_storage` (the innermost saved-tensor
    hooks of a memory-efficient forward) reports what it keeps; the hooks installed here see the
    tensors saved anywhere else.
    """
    token = _observer.set(observe)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: observe(t) or t, lambda t: t):
            yield
    finally:
        _observer.reset(token)


@contextlib.contextmanager
def spike_storage(enabled: bool = True) -> Iterator[None]:
    """In this block, spikes registered by :func:`mark_spikes` are saved for backward as uint8."""
    if not enabled:
        yield
        return
    store = _SpikeStore()
    token = _active.set(store)
    try:
        with torch.autograd.graph.saved_tensors_hooks(store.pack, _unpack):
            yield
    finally:
        _active.reset(token)


def storing_spikes() -> bool:
    """True inside :func:`spike_storage` (a memory-efficient forward pass)."""
    return _active.get() is not None


def mark_spikes(spikes: torch.Tensor) -> torch.Tensor:
    """Register ``spikes`` (values 0 or 1) with the active :func:`spike_storage`; return them."""
    store = _active.get()
    if store is not None:
        store.mark(spikes)
    return spikes
