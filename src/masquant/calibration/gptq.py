"""GPTQ rounding of a stored weight (``w_rounding="gptq"``), after smoothing.

The codes of ``W~ = W * s`` are chosen column by column, each rounding error spread over the columns not yet
rounded through the inverse Hessian ``H = X~^T X~`` of the smoothed calibration inputs (Frantar et al., 2022),
so that ``|| X~ (W~ - Q)^T ||`` is small rather than ``|| W~ - Q ||``. The grid is the one round-to-nearest
uses (scales and zero points of ``W~`` as it is, per channel, group or tensor), so the stored format, the
kernels and the export are unchanged; only which grid point each weight takes differs.
"""

from __future__ import annotations

import logging

import torch

from ..modality import Modality
from ..runtime.primitives import IntGrid, QuantizedWeight, choose_qparams, group_rows, quantize

log = logging.getLogger("masquant")

DAMP = 0.01  # added to H's diagonal, relative to its mean (GPTQ's default)
BLOCK = 128  # columns rounded together before the error reaches the rest (lazy batch updates)


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, grid: IntGrid, group_size: int = 0,
                damp: float = DAMP, block: int = BLOCK) -> QuantizedWeight:
    """Codes of ``weight`` (``[out, in]``, already smoothed) on round-to-nearest's grid, rounded by GPTQ with
    ``hessian`` (``[in, in]``, the smoothed inputs' ``X^T X``). Inputs without signal (zero diagonal) are
    rounded to nearest and pass no error on."""
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"GPTQ: a Hessian of shape {tuple(hessian.shape)} for a weight with {in_features} inputs")
    if not torch.isfinite(hessian).all():
        raise ValueError("GPTQ: the calibration inputs' second moments hold NaN/Inf")
    scale, zero = choose_qparams(group_rows(weight.detach().float(), group_size), grid)  # (round-to-nearest's)
    w = weight.detach().double().clone()
    col_scale = _per_column(scale.double(), out_features, in_features, group_size)
    col_zero = _per_column(zero.double(), out_features, in_features, group_size)
    h = hessian.detach().double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    upper = _inverse_cholesky(h)
    codes = torch.empty_like(w)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        part, errors, inv = w[:, start:stop].clone(), torch.zeros_like(w[:, start:stop]), upper[start:stop, start:stop]
        for i in range(stop - start):
            j = start + i
            q = quantize(part[:, i:i + 1], col_scale[:, j:j + 1], col_zero[:, j:j + 1], grid).double()
            codes[:, j] = q[:, 0]
            err = (part[:, i] - (q[:, 0] - col_zero[:, j]) * col_scale[:, j]) / inv[i, i]
            part[:, i:] -= err[:, None] * inv[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return QuantizedWeight(codes.to(grid.storage_dtype), scale, zero, group_size)


def _per_column(values: torch.Tensor, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    """Per-row-group quantization parameters (``[rows, 1]`` of ``group_rows``) as one value per weight entry."""
    if group_size == 0:
        return values.expand(out_features, in_features)
    if group_size == -1:
        return values.reshape(1, 1).expand(out_features, in_features)
    return values.reshape(out_features, in_features // group_size).repeat_interleave(group_size, dim=1)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1``, raising the damping tenfold (up to three times) where ``H`` is not
    positive definite in float64."""
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(h)
        if not int(info):
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not int(info):
                return upper
        extra = DAMP * 10 ** (attempt + 1) * float(h.diagonal().mean())
        log.warning("GPTQ: the Hessian is not positive definite; adding %.3g to its diagonal", extra)
        h = h + extra * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    raise ValueError("GPTQ: the calibration inputs' Hessian stays singular after damping; add calibration samples "
                     "or use w_rounding='rtn'")


def hessian(site, table: torch.Tensor, modalities: tuple[Modality, ...]) -> torch.Tensor | None:
    """``sum_m diag(1/s_m) C_m diag(1/s_m)``: the second moments of the tokens of ``modalities`` at ``site``, each
    smoothed by its own row of ``table`` as it reaches the weight; None when none of them has tokens there."""
    parts = [(m, site.per_modality[m]) for m in modalities if m in site.per_modality]
    if not parts:
        return None
    if any(stats.second is None for _, stats in parts):
        raise RuntimeError("GPTQ needs the inputs' second moments; the pipeline did not collect them")
    total = None
    for m, stats in parts:
        inv = 1.0 / table[int(m)].double().to(stats.second.device)
        part = stats.second * inv[:, None] * inv[None, :]
        total = part if total is None else total + part
    return total


def round_stored(qlinear, linear: torch.nn.Linear, site) -> None:
    """Re-round ``qlinear``'s stored weights with GPTQ: the shared one (``Q(W * s_text)``) with the Hessian of every
    token that reads it (each through its own vector: MASQuant's patched modalities too, whose residual the
    patches then fit), each MAS-only weight with its modality's."""
    table = qlinear.smooth
    own = {Modality[name.upper()]: stored for name, stored in qlinear.modality_qweights.items()}
    weights = [(qlinear.qweight, Modality.TEXT, tuple(m for m in Modality if m not in own))]
    weights += [(stored, m, (m,)) for m, stored in own.items()]
    for stored, modality, tokens in weights:
        h = hessian(site, table, tokens)
        if h is None:  # no calibration token reads this weight: round to nearest stays
            continue
        smoothed = linear.weight.detach().float() * table[int(modality)].to(linear.weight.device)  # (as RTN's)
        stored.set(gptq_weight(smoothed, h.to(smoothed.device), qlinear.grid, qlinear.w_group_size))
    qlinear.rounding = "gptq"
