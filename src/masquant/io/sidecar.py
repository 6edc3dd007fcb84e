"""Reading an exported checkpoint back, with or without its modality sidecar.

``load_export`` loads the checkpoint through transformers as a server would; with ``sidecar=True``
it wraps the linears the sidecar names in ``SidecarLinear``, which routes non-text tokens like the
masquant runtime: a linear with ``s_text`` folded into its norm feeds modality m ``x * s_text / s_m``
through the exported weight plus its patch ``(x * s_text / s_m) @ l1 @ l2``; a re-quantized linear
(``o_proj``) keeps the text path for every token, since its patches no longer fit its weight.
This is the reference for serving runtimes and what ``masquant eval`` uses to score exports.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..modality import NUM_MODALITIES, ModalityRouter, attach_router
from ..runtime.qlinear import replace_module
from ..runtime.stored import patch_rows

log = logging.getLogger("masquant")

SIDECAR = "masquant_sidecar"


class SidecarLinear(nn.Module):
    """An exported linear plus per-modality input scales and low-rank patches."""

    def __init__(self, base: nn.Module, smooth: torch.Tensor, patches: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 router: ModalityRouter):
        super().__init__()
        self.base, self.router = base, router
        self.register_buffer("relative", smooth[:1] / smooth)  # row m: s_text / s_m
        self.patched = sorted(patches)
        for m, (l1, l2) in patches.items():  # buffers, so that .to(device) moves them
            self.register_buffer(f"l1_{m}", l1.float())
            self.register_buffer(f"l2_{m}", l2.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        routes = self.router.routes(x)
        for m in range(NUM_MODALITIES):
            idx = routes.indices(m)
            if idx is None or (m == 0 and m not in self.patched):  # (text rows: the base's output, if unpatched)
                continue
            xm = rows.index_select(0, idx)
            if m:
                xm = xm * self.relative[m].to(rows.dtype)
            ym = self.base(xm) if m else out.index_select(0, idx)
            if m in self.patched:
                l1, l2 = getattr(self, f"l1_{m}"), getattr(self, f"l2_{m}")
                ym = ym + ((xm.float() @ l1) @ l2).to(ym.dtype)
            out = out.index_copy(0, idx, ym)
        return out.reshape(y.shape)


def read_sidecar(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta_file, tensor_file = path / f"{SIDECAR}.json", path / f"{SIDECAR}.safetensors"
    if not meta_file.exists() or not tensor_file.exists():
        raise FileNotFoundError(f"{path} has no {SIDECAR}.json / .safetensors (not written by masquant export)")
    return json.loads(meta_file.read_text()), load_file(str(tensor_file))


def apply_sidecar(model: nn.Module, path: str | Path) -> int:
    """Wrap the linears named by the sidecar at ``path`` in ``SidecarLinear``; returns how many."""
    from ..arch import get_adapter

    meta, tensors = read_sidecar(Path(path))
    router = get_adapter(model).router(model.config)
    requantized, wrapped = set(meta.get("requantized", [])), 0
    for name, layout in meta["linears"].items():
        if name in requantized:
            continue
        patches = {row: (tensors[f"{name}.patches.{m}.l1"], tensors[f"{name}.patches.{m}.l2"])
                   for m in layout["patches"] for row in patch_rows(m)}
        base = model.get_submodule(name)
        replace_module(model, name, SidecarLinear(base, tensors[f"{name}.smooth"].float(), patches, router))
        wrapped += 1
    attach_router(model, router)
    if requantized:
        log.info("sidecar: %d re-quantized linears keep the text path for every token", len(requantized))
    return wrapped


def is_export(path: str | Path) -> bool:
    return (Path(path) / f"{SIDECAR}.json").exists()


def load_export(path: str | Path, sidecar: bool = True):
    """``(model, processor, reference)`` of an exported checkpoint, loaded through transformers
    (compressed-tensors) as a server would; with ``sidecar``, non-text tokens routed by it."""
    from .hf import load_hf

    path = Path(path)
    model, processor = load_hf(path)
    meta, _ = read_sidecar(path)
    if sidecar:
        n = apply_sidecar(model, path)
        log.info("sidecar applied to %d linears", n)
    return model, processor, meta.get("reference")
