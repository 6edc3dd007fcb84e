"""Cross-modal low-rank compensation (CMC): whitened truncated SVD of weight residuals.

For a modality m the stored text weight ``Wq = Q(W * s_text)`` leaves a residual
``dW = W * s_m - Wq``. What matters is its effect on that modality's smoothed activations
``X~ = X_m / s_m``: the patch ``L1 @ L2`` (``[in, r] @ [r, out]``) minimises
``|| X~ (dW^T - L1 L2) ||_F`` over rank-r matrices. With ``C = X~^T X~ = T^T T``
(``T = Lambda^1/2 U^T``), the optimum is the truncated SVD of ``T dW^T``, mapped back by
``T^-1`` (the SVD-LLM truncation-aware whitening argument). All of it runs in float64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("masquant")

SPECTRUM_KEEP = 64  # singular values kept in reports


@dataclass
class LowRank:
    """A rank-r patch and what it cost / kept."""

    l1: torch.Tensor  # [in, r]
    l2: torch.Tensor  # [r, out]
    spectrum: list[float]  # leading singular values of the (whitened) residual
    energy_kept: float  # fraction of squared singular values inside the rank


def resolve_rank(rank: int | float, in_features: int, out_features: int, where: str = "") -> int:
    """An int rank as is, a float as a ratio of min(in, out); clamped to min(in, out) with a warning."""
    full = min(in_features, out_features)
    r = round(rank * full) if isinstance(rank, float) else int(rank)
    if r > full:
        log.warning("%srank %d exceeds min(in, out) = %d; using full rank %d (exact compensation)",
                    where, r, full, full)
        r = full
    return r


def whitening(cov: torch.Tensor, ridge: float = 0.0, smooth: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``T`` and ``T^-1`` with ``T^T T = cov + ridge * mean(diag(cov)) * I`` (float64).

    With ``smooth`` (``s``), the factors of the covariance of ``X / s`` instead:
    ``T^T T = diag(1/s) (cov + ridge * mean(diag(cov)) * I) diag(1/s)`` (the ridge is applied
    before smoothing), from ``whitening_basis(cov, ridge)``, which does not depend on ``s``.
    """
    return scaled_whitening(whitening_basis(cov, ridge), smooth)


def whitening_basis(cov: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of the eigenvalues and the eigenvectors of ``cov + ridge * mean(diag(cov)) * I``
    (float64); raises ``ValueError`` when that matrix is singular."""
    cov = cov.double()
    n = cov.shape[0]
    damp = ridge * float(cov.diagonal().mean()) if ridge > 0 else 0.0
    cov = cov + damp * torch.eye(n, dtype=cov.dtype, device=cov.device)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    floor = torch.finfo(torch.float64).eps * max(float(eigvals.max()), 1e-300) * n
    if float(eigvals.min()) <= floor:
        raise ValueError(
            "activation covariance is singular (too few calibration tokens for this modality, or dead "
            "channels); raise `ridge` (e.g. 1e-4) or add calibration samples")
    return eigvals.sqrt(), eigvecs


def scaled_whitening(basis: tuple[torch.Tensor, torch.Tensor], smooth: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``T = Lambda^1/2 U^T diag(1/s)`` and ``T^-1 = diag(s) U Lambda^-1/2``: any ``T`` with
    ``T^T T = C`` gives the same optimal truncation, so one eigendecomposition of the
    unsmoothed covariance serves every smoothing vector tried."""
    root, eigvecs = basis
    t, t_inv = root[:, None] * eigvecs.T, eigvecs / root[None, :]
    if smooth is None:
        return t, t_inv
    s = smooth.to(device=t.device, dtype=torch.float64)
    return t / s[None, :], t_inv * s[:, None]


def low_rank_patch(delta_w: torch.Tensor, rank: int, cov: torch.Tensor | None = None,
                   ridge: float = 0.0, whitener: tuple[torch.Tensor, torch.Tensor] | None = None) -> LowRank:
    """Rank-``rank`` factors of ``delta_w.T`` (``delta_w`` is ``[out, in]``).

    With ``cov`` (``X~^T X~``), or its ``whitening`` already computed, the truncation is
    whitened; without either, plain SVD.
    """
    target = delta_w.double().T  # [in, out]
    if whitener is None and cov is not None:
        whitener = whitening(cov, ridge)
    a = target if whitener is None else whitener[0] @ target
    u, sigma = _left_singular(a, rank)
    l1 = u if whitener is None else whitener[1] @ u
    l2 = u.T @ a  # = sigma_r V_r^T
    return LowRank(l1, l2, *_spectrum(sigma, rank))


def _left_singular(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` leading left singular vectors of ``a`` and all its singular values
    (descending), from the eigendecomposition of the smaller Gram matrix (float64): several
    times cheaper than a full SVD, and as exact for the leading directions."""
    rows, cols = a.shape
    if rows <= cols:
        energy, vecs = torch.linalg.eigh(a @ a.T)
        energy, vecs = energy.flip(0).clamp_min(0), vecs.flip(1)
        return vecs[:, :rank], energy.sqrt()
    energy, vecs = torch.linalg.eigh(a.T @ a)
    energy, vecs = energy.flip(0).clamp_min(0), vecs.flip(1)
    sigma = energy.sqrt()
    keep = sigma[:rank] > sigma[0] * 1e-12 if rank else sigma[:0] > 0
    u = torch.zeros(rows, rank, dtype=a.dtype, device=a.device)
    u[:, keep] = (a @ vecs[:, :rank][:, keep]) / sigma[:rank][keep]
    return u, sigma


def spectrum(delta_w: torch.Tensor, rank: int, whitener: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[list[float], float]:
    """Leading singular values and energy kept at ``rank`` of the (whitened) residual, without
    the singular vectors (for reports of the variant that is not used)."""
    a = delta_w.double().T
    a = a if whitener is None else whitener[0] @ a
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return _spectrum(torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt(), rank)


def _spectrum(sigma: torch.Tensor, rank: int) -> tuple[list[float], float]:
    energy = sigma.pow(2)
    kept = float(energy[:rank].sum() / energy.sum()) if float(energy.sum()) > 0 else 1.0
    return sigma[:SPECTRUM_KEEP].tolist(), kept


def compensate_linear(qlinear, linear: torch.nn.Linear, site, config, where: str = "",
                      cache: dict | None = None, report: bool = True) -> dict[str, dict]:
    """Attach a CMC patch to ``qlinear`` for every non-text modality of ``site``; return the report.

    ``qlinear`` holds ``Q(W * s_text)`` and the per-modality smoothing table; ``site`` holds
    the per-modality second moments of the layer input (unsmoothed). ``cache`` (keyed by
    ``where``, the modality and both vectors) spares recomputing a patch that a previous call
    already derived for the same vectors (the CMC guard tries several tables per layer).
    ``report=False`` (the guard's trial tables) skips the spectrum of the variant that is not
    used (plain SVD, or whitened for the ablation); it is computed when a report asks for it.
    """
    from .modality import Modality

    text_weight = None
    info = {}
    for modality, stats in sorted(site.per_modality.items()):
        if modality == Modality.TEXT:
            continue
        key = (where, int(modality), qlinear.smooth[0].cpu().numpy().tobytes(),
               qlinear.smooth[int(modality)].cpu().numpy().tobytes())
        if cache is None or key not in cache:
            if text_weight is None:
                text_weight = qlinear.dequantized_weight().double()
            found = _patch_for(qlinear, linear, modality, stats, config, text_weight, where, cache)
            if cache is not None:
                cache[key] = found
        patch, entry, complete = cache[key] if cache is not None else found
        if report:
            complete()
        if patch is not None:
            qlinear.add_patch(modality, *patch)
        info[modality.name.lower()] = dict(entry)
    return info


def _patch_for(qlinear, linear, modality, stats, config, text_weight, where, cache=None):
    """``(patch or None, report entry, complete)``: ``complete()`` adds the spectrum of the
    variant that was not used to the entry (once)."""
    smooth = qlinear.smooth[int(modality)].double()
    delta = _residual(qlinear, linear, modality, config, text_weight)
    rank = resolve_rank(config.rank, linear.in_features, linear.out_features, where)
    if rank == 0 or not bool(delta.any()):  # nothing to fit: no whitening (and no covariance check) needed
        entry = {"rank": rank, "whiten": config.whiten, "residual": config.residual, "ridge": config.ridge,
                 "tokens": stats.count, "patch_bytes": 0,
                 "skipped": "rank 0" if rank == 0 else "zero residual"}
        return None, entry, lambda: None
    if config.whiten:
        chosen = low_rank_patch(delta, rank, whitener=_whitener(stats, modality, smooth, config.ridge, cache))
    else:  # the plain-SVD ablation
        chosen = low_rank_patch(delta, rank)
    used, other = ("whitened", "plain") if config.whiten else ("plain", "whitened")
    patch_bytes = rank * (linear.in_features + linear.out_features) * qlinear.patch_dtype.itemsize
    entry = {
        "rank": rank, "whiten": config.whiten, "residual": config.residual, "ridge": config.ridge,
        "tokens": stats.count, "energy_kept": chosen.energy_kept,
        f"{used}_energy_kept": chosen.energy_kept, f"{used}_spectrum": chosen.spectrum, "patch_bytes": patch_bytes,
    }

    del delta  # float64, twice the linear's float32 size: the closure below recomputes it if asked

    def complete() -> None:
        if f"{other}_spectrum" in entry:
            return
        residual = _residual(qlinear, linear, modality, config, qlinear.dequantized_weight().double())
        if config.whiten:
            values = spectrum(residual, rank)
        else:  # the whitened spectrum is only reported, when the covariance allows it
            try:  # no `cache` in this closure: the cache holds the closure (no reference cycle)
                values = spectrum(residual, rank, _whitener(stats, modality, smooth, config.ridge, None))
            except ValueError:
                values = ([], None)
        entry[f"{other}_spectrum"], entry[f"{other}_energy_kept"] = values

    return (chosen.l1, chosen.l2), entry, complete


def _residual(qlinear, linear, modality, config, text_weight: torch.Tensor) -> torch.Tensor:
    """``dW = W * s_m - Q(W * s_text)`` (or ``Q(W * s_m) - Q(W * s_text)``), float64."""
    if config.residual == "quantized":
        target = qlinear.quantize_smoothed(linear.weight, modality).dequantize().double()
    else:
        target = linear.weight.detach().double() * qlinear.smooth[int(modality)].double()
    return target - text_weight


def _whitener(stats, modality, smooth: torch.Tensor, ridge: float, cache: dict | None):
    """``whitening`` of the smoothed covariance. Through ``cache``, the eigendecomposition of the
    unsmoothed covariance is shared by every vector tried at this input, and the factors by the
    linears that read the same input (q/k/v, gate/up)."""
    key = ("whitening", id(stats), int(modality), smooth.cpu().numpy().tobytes(), ridge)
    if cache is not None and key in cache:
        return cache[key]
    basis_key = ("whitening basis", id(stats), int(modality), ridge)
    basis = cache.get(basis_key) if cache is not None else None
    if basis is None:
        basis = whitening_basis(stats.second, ridge)
        if cache is not None:
            cache[basis_key] = basis
    found = scaled_whitening(basis, smooth)
    if cache is not None:
        cache[key] = found
    return found
