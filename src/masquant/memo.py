"""``Derived``: one value computed from tensors, kept until one of them changes. The one cache
masquant keeps for derived forms (unpacked codes, folded patches, routes, flags, native plans)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def _state(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return t._version, t.data_ptr(), t.device, t.dtype, t.shape, t.stride()


class Derived(Generic[T]):
    """``get(sources, make, key)`` returns ``make()``, recomputed when ``key`` differs or a source
    tensor changed: edited in place (version counter), given other storage or moved (address,
    device), or replaced by a tensor that is not the same view of the same memory. It holds the
    sources, so no address it compares can be reused while the value lives."""

    __slots__ = ("_key", "_sources", "_states", "_value")

    def __init__(self) -> None:
        self._sources: tuple | None = None

    def get(self, sources: tuple[torch.Tensor | None, ...], make: Callable[[], T], key: Hashable = None) -> T:
        held = self._sources
        if held is not None and len(held) == len(sources) and self._key == key:  # (a plain loop: a hot path)
            for old, new, state in zip(held, sources, self._states, strict=True):
                if old is new:  # the same tensor: edited in place (version) or given other storage (address)?
                    if new is not None and (new._version != state[0] or new.data_ptr() != state[1]):
                        break
                elif old is None or new is None or _state(new) != state:  # e.g. a new view of the same rows
                    break
            else:
                return self._value
        value = make()
        self._sources, self._states, self._key, self._value = sources, tuple(map(_state, sources)), key, value
        return value

    def peek(self) -> T | None:
        """The value kept, without checking it (None when there is none)."""
        return None if self._sources is None else self._value

    def clear(self) -> None:
        self._sources = None
