"""What a quantized linear stores besides its smoothing table: the integer weight (``IntWeight``: codes,
scales, zero points, packed two per byte at <= 4 bits, with derived forms cached) and MASQuant's low-rank
patches (``LowRankPatch``). ``qlinear.QuantLinear`` puts them together."""

from __future__ import annotations

import torch
from torch import nn

from ..memo import Derived
from ..modality import Modality
from . import native
from .kernels import pack_int4, unpack_int4
from .primitives import IntGrid, QuantizedWeight, group_rows


class IntWeight(nn.Module):
    """A weight ``[out, in]`` as signed codes: ``W = scale * (codes - zero)`` per row of ``group_rows`` (zero 0 on
    symmetric grids). At <= 4 bits ``codes`` is uint8 ``[out, ceil(in / 2)]`` (``kernels.pack_int4``), else int8;
    the runtime uses the int8 codes from ``int8()`` (unpacked once, cached)."""

    def __init__(self, out_features: int, in_features: int, grid: IntGrid, group_size: int):
        super().__init__()
        self.group_size, self.grid, self.in_features = group_size, grid, in_features
        self.packed = grid.bits <= 4
        shape = (out_features, (in_features + 1) // 2) if self.packed else (out_features, in_features)
        rows = _scale_rows(out_features, in_features, group_size)
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.uint8 if self.packed else torch.int8))
        self.register_buffer("scale", torch.ones(rows, 1))
        self.register_buffer("zero", torch.zeros(rows, 1))
        self._derived: dict[str, Derived] = {}  # unpacked, summed and natively packed codes

    @property
    def offset(self) -> int:
        """What is subtracted from the grid's codes to make them signed (asymmetric grids)."""
        return 0 if self.grid.symmetric else 2 ** (self.grid.bits - 1)

    def set(self, qw: QuantizedWeight) -> None:
        signed = (qw.codes.to(torch.int16) - self.offset).to(torch.int8)
        self.codes.copy_(pack_int4(signed) if self.packed else signed)
        self.scale.copy_(qw.scale)
        self.zero.copy_(qw.zero - self.offset)

    def __setstate__(self, state: dict) -> None:  # (modules pickled before ``_derived`` existed)
        state.setdefault("_derived", {})
        super().__setstate__(state)

    def _cached(self, name: str, make, sources: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``make()``, computed once and kept until the codes (or ``sources``) change."""
        return self._derived.setdefault(name, Derived()).get(sources or (self.codes,), make)

    def int8(self) -> torch.Tensor:
        """Signed int8 codes ``[out, in]`` (unpacked and cached when stored packed)."""
        if not self.packed:
            return self.codes
        return self._cached("int8", lambda: unpack_int4(self.codes, self.in_features))

    def row_sums(self) -> torch.Tensor:
        """Each row's sum of signed codes (int32 ``[out]``, for the native kernel), cached like ``int8()``: the sum
        costs more than a decoding step's GEMV."""
        return self._cached("sums", lambda: self.int8().sum(1, dtype=torch.int32))

    def native_codes(self) -> torch.Tensor:
        """The codes in the native kernel's layout (``native.pack``), cached like ``int8()``."""
        return self._cached("native", lambda: native.pack(self.int8()))

    def gemm_codes(self) -> torch.Tensor:
        """The codes in the blocked native GEMM's layout (``native.pack_pairs``), cached like ``int8()``."""
        return self._cached("pairs", lambda: native.pack_pairs(self.int8()))

    def float32(self) -> torch.Tensor:
        """The dequantized weight in float32, cached (the ``dequant`` kernels, where integer GEMMs are slow)."""
        return self._cached("float32", lambda: self.dequantize(torch.float32), (self.codes, self.scale, self.zero))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        codes = self.int8()
        rows = group_rows(codes.float(), self.group_size)
        return ((rows - self.zero) * self.scale).reshape(codes.shape).to(dtype)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


_MODALITY_INDEX = {m.name.lower(): int(m) for m in Modality}  # a patch's key -> its row of the table
ALL = "all"  # the key of a patch for every row (the same-budget baseline's shared patch)
EVERY_ROW = -1


def patch_row(name: str) -> int:
    """The table row of the patch named ``name`` (a modality), or ``EVERY_ROW`` for ``"all"``."""
    if name == ALL:
        return EVERY_ROW
    row = _MODALITY_INDEX.get(name)
    if row is None:
        raise ValueError(f"a patch named {name!r}: patches are named by modality ({', '.join(_MODALITY_INDEX)}) "
                         f"or {ALL!r} (every token)")
    return row


def patch_rows(name: str) -> tuple[int, ...]:
    """The table rows whose tokens the patch named ``name`` applies to."""
    row = patch_row(name)
    return _EVERY if row == EVERY_ROW else (row,)


_EVERY = tuple(_MODALITY_INDEX.values())


class LowRankPatch(nn.Module):
    """``(x / s) @ l1 @ l2`` with ``l1: [in, r]``, ``l2: [r, out]`` (stored in any float dtype,
    applied in the dtype of ``x``). The smoothing vector ``s`` is folded into ``l1``
    (``x @ (l1 / s)``), so the patch reads the unsmoothed rows and needs no smoothing pass."""

    def __init__(self, l1: torch.Tensor, l2: torch.Tensor):
        super().__init__()
        self.register_buffer("l1", l1)
        self.register_buffer("l2", l2)
        self._factors: Derived = Derived()

    def factors(self, dtype: torch.dtype, smooth: torch.Tensor, row: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(l1 / s, l2)`` for inputs of ``dtype``, cached as the same pair object until a tensor changes (native plans
        compare it by identity); ``s`` is ``smooth``, or row ``row`` of the table ``smooth``. ``l1 / s`` is float32
        for fp16 inputs, as it can exceed fp16's range."""
        l1, l2 = self._buffers["l1"], self._buffers["l2"]  # (direct: skips nn.Module's __getattr__)

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            work = torch.float32 if dtype == torch.float16 else dtype
            s = smooth if row is None else smooth[row]
            return l1.to(work) / s.to(work)[:, None], l2.to(dtype)

        return self._factors.get((l1, l2, smooth), fold, key=(dtype, row))

    def down(self, x: torch.Tensor, smooth: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """``(x / s) @ l1``: the rank-r projection, ``[rows, r]`` (fp16 inputs: computed in float32)."""
        return _project(x, self.factors(x.dtype, smooth, row)[0])

    def forward(self, x: torch.Tensor, smooth: torch.Tensor, row: int | None = None) -> torch.Tensor:
        l1, l2 = self.factors(x.dtype, smooth, row)
        return _project(x, l1) @ l2

    def add_to(self, y: torch.Tensor, x: torch.Tensor, smooth: torch.Tensor, row: int | None = None) -> None:
        """``y += forward(x, smooth, row)`` in place (``y``: the output rows of ``x``, e.g. a view), the
        second product accumulated into ``y`` by the GEMM itself."""
        l1, l2 = self.factors(x.dtype, smooth, row)
        y.addmm_(_project(x, l1).to(y.dtype), l2.to(y.dtype))


def _project(x: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    return (x.to(l1.dtype) @ l1).to(x.dtype)


def _scale_rows(out_features: int, in_features: int, group_size: int) -> int:
    if group_size == 0:
        return out_features
    if group_size == -1:
        return 1
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features={in_features}")
    return out_features * (in_features // group_size)
