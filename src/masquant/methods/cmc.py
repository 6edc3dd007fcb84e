"""Cross-modal low-rank compensation (CMC): whitened truncated SVD of weight residuals.

The stored text weight ``Wq = Q(W * s_text)`` leaves modality m a residual ``dW = W * s_m - Wq``. The
patch ``L1 @ L2`` (``[in, r] @ [r, out]``) minimises ``|| X~ (dW^T - L1 L2) ||_F`` on the smoothed
activations ``X~ = X_m / s_m``: with ``X~^T X~ = T^T T``, the truncated SVD of ``T dW^T`` mapped back
by ``T^-1`` (SVD-LLM's truncation-aware whitening). All in float64.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..runtime.stored import ALL

log = logging.getLogger("masquant")

SPECTRUM_KEEP = 64  # singular values kept in reports


PATCH_DTYPES = ("float16", "bfloat16", "float32")


def parse_rank(text: str) -> int | float | str:
    """``32`` (a rank), ``0.05`` (a ratio of min(in, out)) or ``ratio:0.05,floor:32`` (a rule):
    the CLI's form of ``rank``."""
    if ":" in text:
        rank_rule(text)
        return text
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


@dataclass
class PatchSettings:
    """How low-rank patches are fitted and stored (MASQuant's CMC and the shared-patch baseline ``lrc``)."""

    rank: int | float | str = field(default=32, metadata={
        "help": "patch rank: an int, a ratio in (0, 1) of min(in, out), or the rule ratio:R,floor:F "
                "(max(R * min(in, out), F)); 0 = no patch", "parse": parse_rank})
    whiten: bool = field(default=True, metadata={"help": "whitened SVD (off: the plain-SVD ablation)"})
    ridge: float = field(default=1e-6, metadata={"help": "added to the covariance, relative to its mean diagonal"})
    patch_dtype: str = field(default="float16", metadata={"help": "how patch factors are stored",
                                                           "choices": PATCH_DTYPES})

    def check_patch(self) -> None:
        if isinstance(self.rank, str):
            rank_rule(self.rank)
        elif isinstance(self.rank, bool) or not isinstance(self.rank, int | float) or self.rank < 0 or (
                isinstance(self.rank, float) and self.rank > 1):
            raise ValueError(f"rank must be an int >= 0, a float ratio in [0, 1] of min(in, out) or a rule "
                             f"ratio:R,floor:F, got {self.rank!r}")
        if self.ridge < 0:
            raise ValueError("ridge must be >= 0")
        if self.patch_dtype not in PATCH_DTYPES:
            raise ValueError(f"patch_dtype must be one of {', '.join(PATCH_DTYPES)}, got {self.patch_dtype!r}")


@dataclass
class LowRank:
    """A rank-r patch and what it cost / kept."""

    l1: torch.Tensor  # [in, r]
    l2: torch.Tensor  # [r, out]
    spectrum: list[float]  # leading singular values of the (whitened) residual
    energy_kept: float  # fraction of squared singular values inside the rank


def rank_rule(text: str) -> tuple[float, int]:
    """``"ratio:R,floor:F"`` (the reference implementation's rule) -> ``(R, F)``: rank
    ``max(round(R * min(in, out)), F)``, at most full rank. ``floor`` may be left out (0)."""
    items = text.replace(" ", "").split(",")
    parts = dict(item.split(":", 1) for item in items if ":" in item)
    try:
        if len(parts) != len(items) or set(parts) - {"ratio", "floor"} or "ratio" not in parts:
            raise ValueError
        ratio, floor = float(parts["ratio"]), int(parts.get("floor", 0))
    except ValueError:
        raise ValueError(f"rank rule {text!r}: write ratio:R,floor:F, e.g. ratio:0.05,floor:32") from None
    if not 0 < ratio <= 1 or floor < 0:
        raise ValueError(f"rank rule {text!r}: the ratio must lie in (0, 1] and the floor be >= 0")
    return ratio, floor


def resolve_rank(rank: int | float | str, in_features: int, out_features: int, where: str = "") -> int:
    """An int rank as is, a float as a ratio of min(in, out), a ``rank_rule`` string by its rule; an
    explicit rank above min(in, out) is clamped with a warning."""
    full = min(in_features, out_features)
    if isinstance(rank, str):
        ratio, floor = rank_rule(rank)
        return min(max(round(ratio * full), floor), full)
    r = round(rank * full) if isinstance(rank, float) else int(rank)
    if r > full:
        log.warning("%srank %d exceeds min(in, out) = %d; using full rank %d (exact compensation)",
                    where, r, full, full)
        r = full
    return r


def whitening(cov: torch.Tensor, ridge: float = 0.0, smooth: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``T`` and ``T^-1`` (float64) with ``T^T T = cov + ridge * mean(diag(cov)) * I``; with ``smooth`` ``s``,
    of the covariance of ``X / s``: ``diag(1/s) (cov + ridge ...) diag(1/s)`` (ridge applied before smoothing)."""
    return scaled_whitening(whitening_basis(cov, ridge), smooth)


def whitening_basis(cov: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``T0``, ``T0^-1`` (float64) with ``T0^T T0 = C = cov + ridge * mean(diag(cov)) * I``: ``Lambda^1/2 U^T``
    below ``FAST_MIN`` channels, else the cheaper Cholesky ``L^T`` with ``T0^-1 = None`` (same truncations).
    Raises ``ValueError`` when ``C`` is singular (smallest eigenvalue <= ``eps * max eigenvalue * n``)."""
    cov = cov.double()
    n = cov.shape[0]
    damp = ridge * float(cov.diagonal().mean()) if ridge > 0 else 0.0
    cov = cov + damp * torch.eye(n, dtype=cov.dtype, device=cov.device)
    fast = n >= FAST_MIN
    eigvals, eigvecs = (torch.linalg.eigvalsh(cov), None) if fast else torch.linalg.eigh(cov)
    floor = torch.finfo(torch.float64).eps * max(float(eigvals.max()), 1e-300) * n
    lower, info = torch.linalg.cholesky_ex(cov) if fast else (None, 0)
    if float(eigvals.min()) <= floor or int(info):
        raise ValueError(
            "activation covariance is singular (too few calibration tokens for this modality, or dead "
            "channels); raise `ridge` (e.g. 1e-4) or add calibration samples")
    if fast:
        return lower.T.contiguous(), None
    root = eigvals.sqrt()
    return root[:, None] * eigvecs.T, eigvecs / root[None, :]


def scaled_whitening(basis: tuple[torch.Tensor, torch.Tensor | None], smooth: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``T = T0 diag(1/s)`` and ``T^-1 = diag(s) T0^-1`` (triangular inversion for a Cholesky basis), so one
    factorisation of the unsmoothed covariance serves every smoothing vector tried."""
    t, t_inv = basis
    if smooth is not None:
        s = smooth.to(device=t.device, dtype=torch.float64)
        t, t_inv = t / s[None, :], None if t_inv is None else t_inv * s[:, None]
    if t_inv is None:  # upper triangular
        t_inv = torch.linalg.solve_triangular(t, torch.eye(t.shape[0], dtype=t.dtype, device=t.device), upper=True)
    return t, t_inv


def low_rank_patch(delta_w: torch.Tensor, rank: int, cov: torch.Tensor | None = None,
                   ridge: float = 0.0, whitener: tuple[torch.Tensor, torch.Tensor] | None = None) -> LowRank:
    """Rank-``rank`` factors of ``delta_w.T`` (``delta_w`` is ``[out, in]``), whitened with ``cov`` (``X~^T X~``)
    or its ``whitener``, else plain SVD. Singular vectors come from the leading eigenpairs of the smaller Gram
    matrix of ``A = T dW^T``; energy kept is relative to its trace, ``|A|_F^2``."""
    target = delta_w.detach().double().T  # [in, out]
    if whitener is None and cov is not None:
        whitener = whitening(cov, ridge)
    t = None if whitener is None else whitener[0]
    gram, a = _gram(target, t)
    energy, vecs = _top_eigh(gram, max(rank, SPECTRUM_KEEP))
    sigma = energy.sqrt()
    if gram.shape[0] == target.shape[0]:  # gram = A A^T: its eigenvectors are A's left singular vectors
        u = vecs[:, :rank]
    else:  # gram = A^T A: right singular vectors, mapped to the left ones by A v / sigma
        keep = sigma[:rank] > sigma[0] * 1e-12 if rank else sigma[:0] > 0
        u = torch.zeros(target.shape[0], rank, dtype=target.dtype, device=target.device)
        u[:, keep] = (a @ vecs[:, :rank][:, keep]) / sigma[:rank][keep]
    l1 = u if t is None else whitener[1] @ u
    l2 = u.T @ a if a is not None else (t.T @ u).T @ target  # = sigma_r V_r^T (u^T T = (T^T u)^T)
    return LowRank(l1, l2, *_spectrum(sigma, float(gram.trace()), rank))


def _gram(target: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The smaller Gram matrix of ``A = T target`` (``A A^T`` if rows <= columns, else ``A^T A``) and ``A`` where
    formed. For much wider than tall ``A`` with >= ``FAST_MIN`` rows, ``T (target target^T) T^T`` is cheaper
    and skips ``A``."""
    rows, cols = target.shape
    if t is not None and cols > 2 * rows and rows >= FAST_MIN:
        return t @ (target @ target.T) @ t.T, None
    a = target if t is None else t @ target
    return (a @ a.T if rows <= cols else a.T @ a), a


# From this many input channels: Cholesky whitening, the Gram shortcut, leading eigenpairs only. Above every
# linear of the reference models, so their results stay bit-for-bit reproducible.
FAST_MIN = 1024


def _top_eigh(gram: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest eigenvalues (descending, clamped at 0) of the symmetric ``gram`` and their eigenvector
    columns. On CPU from ``FAST_MIN`` rows, only those via SciPy's LAPACK ``?syevr``; else ``torch.linalg.eigh``."""
    n = gram.shape[0]
    count = min(count, n)
    linalg = _scipy_linalg() if count < n and n >= FAST_MIN and gram.device.type == "cpu" else None
    if linalg is not None:
        values, vecs = linalg.eigh(gram.numpy(), subset_by_index=[n - count, n - 1], driver="evr",
                                   check_finite=False)
        return torch.from_numpy(values[::-1].copy()).clamp_min(0), torch.from_numpy(vecs[:, ::-1].copy())
    values, vecs = torch.linalg.eigh(gram)
    return values.flip(0)[:count].clamp_min(0), vecs.flip(1)[:, :count]


@functools.cache
def _scipy_linalg():
    try:
        import scipy.linalg
    except ImportError:  # a dependency; without it every eigendecomposition is complete (same result)
        return None
    return scipy.linalg


def spectrum(delta_w: torch.Tensor, rank: int, whitener: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[list[float], float]:
    """Leading singular values and energy kept at ``rank`` of the (whitened) residual, without
    the singular vectors (for reports of the variant that is not used)."""
    gram, _ = _gram(delta_w.detach().double().T, None if whitener is None else whitener[0])
    energy = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    return _spectrum(energy.sqrt(), float(gram.trace()), rank)


def _spectrum(sigma: torch.Tensor, total: float, rank: int) -> tuple[list[float], float]:
    """The first ``SPECTRUM_KEEP`` of the leading singular values ``sigma``, and the fraction of
    the total energy ``total`` (``sum sigma_i^2`` over the whole spectrum) the first ``rank`` hold."""
    kept = min(float(sigma[:rank].pow(2).sum()) / total, 1.0) if total > 0 else 1.0
    return sigma[:SPECTRUM_KEEP].tolist(), kept


def compensate_linear(qlinear, linear: torch.nn.Linear, site, config, where: str = "",
                      cache: dict | None = None, report: bool = True, shared: bool = False) -> dict[str, dict]:
    """Attach a CMC patch to ``qlinear`` (``Q(W * s_text)`` + smoothing table) for every non-text modality of
    ``site`` (unsmoothed input second moments), and for text with ``config.text_patch``; with ``shared``, one
    patch named ``"all"`` fitted on every token's covariance instead (the same-budget baseline). Returns the
    report. ``cache`` reuses patches for the same vectors across the guard's trial tables; ``report=False``
    defers the unused variant's spectrum until asked."""
    from ..modality import Modality

    if shared:
        targets = [(ALL, Modality.TEXT, _all_tokens(site, cache))]
    else:
        targets = [(m.name.lower(), m, stats) for m, stats in sorted(site.per_modality.items())
                   if m != Modality.TEXT or getattr(config, "text_patch", False)]
    text_weight = None
    info = {}
    for name, modality, stats in targets:
        key = (where, name, qlinear.rounding, qlinear.smooth[0].cpu().numpy().tobytes(),
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
            qlinear.add_patch(name, *patch, dtype=getattr(torch, config.patch_dtype))
        info[name] = dict(entry)
    return info


def _all_tokens(site, cache: dict | None):
    """Every modality's statistics at ``site`` summed (counts and ``X^T X``), kept in ``cache`` so its identity
    (a key of the whitening cache) stays the site's."""
    key = ("all tokens", id(site))
    if cache is not None and key in cache:
        return cache[key][1]
    parts = list(site.per_modality.values())
    if any(p.second is None for p in parts):
        raise RuntimeError("a shared patch needs every modality's second moments (text included)")
    merged = SimpleNamespace(count=sum(p.count for p in parts), second=sum(p.second for p in parts))
    if cache is not None:
        cache[key] = (site, merged)  # (the site held too: its id cannot be reused while the entry lives)
    return merged


def _patch_for(qlinear, linear, modality, stats, config, text_weight, where, cache=None):
    """``(patch or None, report entry, complete)``: ``complete()`` adds the spectrum of the
    variant that was not used to the entry (once)."""
    smooth = qlinear.smooth[int(modality)].double()
    delta = _residual(qlinear, linear, modality, config, text_weight)
    rank = resolve_rank(config.rank, linear.in_features, linear.out_features, where)
    kind = getattr(config, "residual", "fp")  # (the shared patch: always the float residual)
    if rank == 0 or not bool(delta.any()):  # nothing to fit: no whitening (and no covariance check) needed
        entry = {"rank": rank, "whiten": config.whiten, "residual": kind, "ridge": config.ridge,
                 "tokens": stats.count, "patch_bytes": 0,
                 "skipped": "rank 0" if rank == 0 else "zero residual"}
        return None, entry, lambda: None
    if config.whiten:
        chosen = low_rank_patch(delta, rank, whitener=_whitener(stats, modality, smooth, config.ridge, cache))
    else:  # the plain-SVD ablation
        chosen = low_rank_patch(delta, rank)
    used, other = ("whitened", "plain") if config.whiten else ("plain", "whitened")
    patch_bytes = rank * (linear.in_features + linear.out_features) * getattr(torch, config.patch_dtype).itemsize
    entry = {
        "rank": rank, "whiten": config.whiten, "residual": kind, "ridge": config.ridge,
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
    if getattr(config, "residual", "fp") == "quantized":
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
