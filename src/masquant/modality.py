"""Modalities, and the one mechanism that tells quantized layers which token is which.

``ModalityRouter`` holds the modality ids (``[batch, seq]``) of the forward pass in
flight. A forward pre-hook on the top-level model sets them from ``input_ids`` and from what
the forward carries: a placeholder is vision or audio only when its features come with it
(a prefill, also after earlier turns in the cache); generated tokens are text. Quantized
linears read ``router.ids``; nothing else is global.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum

import torch

from .memo import Derived


class Modality(IntEnum):
    TEXT = 0
    VISION = 1
    AUDIO = 2


NUM_MODALITIES = len(Modality)


def ids_from_tokens(input_ids: torch.Tensor, table: Mapping[int, Modality]) -> torch.Tensor:
    """Map token ids to modality ids; tokens absent from ``table`` are TEXT."""
    out = torch.full_like(input_ids, int(Modality.TEXT), dtype=torch.long)
    for token, modality in table.items():
        out[input_ids == token] = int(modality)
    return out


@dataclass(frozen=True)
class Routes:
    """The rows of one forward by modality: ``ids`` (flat, one per row) and, for each modality
    present, its rows as a slice (one contiguous run, as an image or a clip usually is) or an
    index tensor. Every per-modality computation in masquant reads its rows from here."""

    ids: torch.Tensor
    rows: dict[int, torch.Tensor | slice]

    @property
    def text_only(self) -> bool:
        return set(self.rows) <= {int(Modality.TEXT)}

    def indices(self, modality: int) -> torch.Tensor | None:
        """The rows of ``modality`` as an index tensor (None if it has none)."""
        idx = self.rows.get(modality)
        if isinstance(idx, slice):
            return torch.arange(idx.start, idx.stop, device=self.ids.device)
        return idx

    def order(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each present modality's row indices (in modality order) and the permutation that puts
        rows gathered in that order back in row order."""
        idx = [self.indices(m) for m in sorted(self.rows)]
        cat = torch.cat(idx)
        back = torch.empty_like(cat).scatter_(0, cat, torch.arange(cat.numel(), device=cat.device))
        return idx, back


def routes_of(ids: torch.Tensor) -> Routes:
    """``Routes`` of flat modality ids."""
    rows: dict[int, torch.Tensor | slice] = {}
    for m in range(NUM_MODALITIES):
        idx = (ids == m).nonzero().squeeze(1)
        if idx.numel():
            first, last = int(idx[0]), int(idx[-1])
            rows[m] = slice(first, last + 1) if last - first + 1 == idx.numel() else idx
    return Routes(ids, rows)


class ModalityRouter:
    """Carries the modality ids of the current forward to the quantized linears."""

    def __init__(self, table: Mapping[int, Modality], carriers: Mapping[Modality, tuple[str, ...]] | None = None):
        self.table = dict(table)
        self.carriers = {Modality(m): tuple(keys) for m, keys in (carriers or {}).items()}  # inputs holding features
        self.ids: torch.Tensor | None = None
        self._scoped = 0
        self._routes = Derived()

    @contextlib.contextmanager
    def scope(self, ids: torch.Tensor) -> Iterator[None]:
        """Use ``ids`` (``[batch, seq]``) for every forward inside the block.

        Inside a scope the model's own hook does not override the ids.
        """
        previous, self.ids = self.ids, ids
        self._scoped += 1
        try:
            yield
        finally:
            self._scoped -= 1
            self.ids = previous

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened ids matching the rows of ``x`` (``[..., features]``)."""
        if self.ids is None:
            raise RuntimeError(
                "masquant: modality ids are not set for this forward. Call the top-level model "
                "with input_ids (the router hook sets them), or wrap the call in "
                "`with masquant.modality_scope(model, modality_ids):`"
            )
        if self.ids.shape != x.shape[:-1]:
            raise RuntimeError(
                f"masquant: modality ids of shape {tuple(self.ids.shape)} do not match the "
                f"activation rows {tuple(x.shape[:-1])}; pass input_ids with the same layout "
                "as the hidden states"
            )
        return self.ids.reshape(-1).to(x.device)

    def routes(self, x: torch.Tensor) -> Routes:
        """The ``Routes`` of the rows of ``x``: computed once per forward and device, not once per
        quantized linear (they all read the same ids)."""
        if self.ids is not None and self.ids.shape == x.shape[:-1]:  # (the check of rows(x), without its reshape)
            return self._routes.get((self.ids,), lambda: routes_of(self.rows(x)), key=x.device)
        return routes_of(self.rows(x))  # (rows(x) raises the error)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook for the top-level model: set ids from ``input_ids`` and what the forward carries."""
        if self._scoped:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            self.ids = None  # inputs_embeds only: layers needing ids raise a clear error
            return
        self.ids = self.forward_ids(input_ids, kwargs)

    def forward_ids(self, input_ids: torch.Tensor, inputs: Mapping[str, object]) -> torch.Tensor:
        """Modality ids of a forward: a placeholder is media only when ``inputs`` carry that
        modality's features (``carriers``), which the model merges into it; otherwise it is text,
        as generated tokens are, with or without a cache. Without carriers, the token decides."""
        ids = ids_from_tokens(input_ids, self.table)
        for modality, keys in self.carriers.items():
            if not any(inputs.get(k) is not None for k in keys):
                ids[ids == int(modality)] = int(Modality.TEXT)
        return ids

    def clear(self, *_: object) -> None:
        if not self._scoped:
            self.ids = None


def attach_router(model: torch.nn.Module, router: ModalityRouter) -> None:
    """Install ``router`` on ``model`` (idempotent): ids set before, cleared after forward."""
    detach_router(model)
    handles = (
        model.register_forward_pre_hook(router.hook, with_kwargs=True),
        model.register_forward_hook(router.clear, always_call=True),
    )
    model._masquant_router = router
    model._masquant_router_handles = handles


def detach_router(model: torch.nn.Module) -> None:
    for handle in getattr(model, "_masquant_router_handles", ()):
        handle.remove()
    model._masquant_router_handles = ()


def get_router(model: torch.nn.Module) -> ModalityRouter:
    router = getattr(model, "_masquant_router", None)
    if router is None:
        raise ValueError("model has not been quantized by masquant (no modality router)")
    return router


def modality_scope(model: torch.nn.Module, ids: torch.Tensor) -> contextlib.AbstractContextManager:
    """Set the modality ids explicitly, e.g. when calling sub-modules or passing inputs_embeds."""
    return get_router(model).scope(ids)
