import pytest
import torch

from masquant import Modality, QuantConfig, QuantLinear
from masquant.calibration.stats import ChannelStats, SiteStats
from masquant.methods.cmc import compensate_linear, low_rank_patch, resolve_rank, whitening
from masquant.modality import NUM_MODALITIES, ModalityRouter


def anisotropic_activations(tokens=400, features=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, features, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(features, features, generator=g, dtype=torch.float64))[0]
    return torch.randn(tokens, features, generator=g, dtype=torch.float64) * scales @ mix


def output_error(x, delta_w, patch):
    return float(torch.linalg.norm(x @ (delta_w.T - patch.l1 @ patch.l2)))


@pytest.mark.parametrize("rank", [1, 3, 8, 16])
def test_whitened_patch_is_the_closed_form_optimum_and_beats_plain_svd(rank):
    x = anisotropic_activations()
    delta_w = torch.randn(40, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whitened = low_rank_patch(delta_w, rank, x.T @ x)
    plain = low_rank_patch(delta_w, rank)
    # independent optimum (Eckart-Young on the outputs): tail of the spectrum of X dW^T
    sigma = torch.linalg.svdvals(x @ delta_w.T)
    optimum = float(sigma[rank:].pow(2).sum().sqrt())
    assert output_error(x, delta_w, whitened) == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    assert output_error(x, delta_w, whitened) <= output_error(x, delta_w, plain) + 1e-9
    assert whitened.l1.shape == (24, rank) and whitened.l2.shape == (rank, 40)


def test_whitening_factorises_the_covariance():
    x = anisotropic_activations()
    cov = x.T @ x
    t, t_inv = whitening(cov)
    assert torch.allclose(t.T @ t, cov, rtol=1e-8, atol=1e-8 * float(cov.abs().max()))
    assert torch.allclose(t @ t_inv, torch.eye(24, dtype=torch.float64), atol=1e-8)



@pytest.mark.parametrize("scipy_present", [True, False])
@pytest.mark.parametrize("shape", ["wide", "square-ish", "tall"])  # wide: the Gram shortcut
def test_large_patches_match_the_svd_optimum(shape, scipy_present, monkeypatch):
    """At FAST_MIN input channels and up the patch comes from the leading eigenpairs alone, and
    a residual more than twice as wide as tall takes its Gram matrix as T (dW^T dW) T^T: both must
    give the Eckart-Young optimum of the full SVD, its singular values and its energy kept (with
    or without SciPy, which only changes the eigensolver)."""
    from masquant.methods import cmc as compensation

    if not scipy_present:
        monkeypatch.setattr(compensation, "_scipy_linalg", lambda: None)
    features, rank = compensation.FAST_MIN, 24
    out_features = {"wide": 2 * features + 64, "square-ish": features + 88, "tall": features // 2 - 56}[shape]
    x = anisotropic_activations(tokens=features + 128, features=features, seed=2)
    delta_w = torch.randn(out_features, features, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s = torch.rand(features, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    patch = low_rank_patch(delta_w, rank, whitener=whitening(x.T @ x, smooth=s))
    sigma = torch.linalg.svdvals((x / s) @ delta_w.T)  # = singular values of T dW^T
    optimum = float(sigma[rank:].pow(2).sum().sqrt())
    assert output_error(x / s, delta_w, patch) == pytest.approx(optimum, rel=1e-9)
    keep = min(compensation.SPECTRUM_KEEP, out_features)
    assert torch.allclose(torch.tensor(patch.spectrum, dtype=torch.float64), sigma[:keep], rtol=1e-9)
    assert patch.energy_kept == pytest.approx(float(sigma[:rank].pow(2).sum() / sigma.pow(2).sum()), rel=1e-9)
    plain = low_rank_patch(delta_w, rank)  # and the plain-SVD ablation, against torch's SVD
    u, sv, vh = torch.linalg.svd(delta_w.T, full_matrices=False)
    assert torch.allclose(plain.l1 @ plain.l2, (u[:, :rank] * sv[:rank]) @ vh[:rank], rtol=0, atol=1e-9 * float(sv[0]))
    values, kept = compensation.spectrum(delta_w, rank)
    assert torch.allclose(torch.tensor(values, dtype=torch.float64), sv[:keep], rtol=1e-9)
    assert kept == pytest.approx(float(sv[:rank].pow(2).sum() / sv.pow(2).sum()), rel=1e-9)

@pytest.mark.reliability(
    case='singular activation covariance without ridge',
    expect='ValueError saying to raise `ridge` or add samples')
@pytest.mark.parametrize("features", [24, 1024])  # eigendecomposition; Cholesky (FAST_MIN channels and up)
def test_singular_covariance_needs_a_ridge(features):
    x = anisotropic_activations(tokens=features // 4, features=features)  # fewer tokens than channels
    with pytest.raises(ValueError, match="raise `ridge`"):
        whitening(x.T @ x)
    dead = anisotropic_activations(tokens=4 * features, features=features)
    dead[:, 3] = 0  # a dead channel
    with pytest.raises(ValueError, match="raise `ridge`"):
        whitening(dead.T @ dead)
    t, t_inv = whitening(x.T @ x, ridge=1e-4)
    assert torch.isfinite(t).all() and torch.isfinite(t_inv).all()
    cov = dead.T @ dead + 1e-4 * float((dead.T @ dead).diagonal().mean()) * torch.eye(features, dtype=torch.float64)
    t, t_inv = whitening(dead.T @ dead, ridge=1e-4)
    assert torch.allclose(t.T @ t, cov, rtol=1e-8, atol=1e-8 * float(cov.abs().max()))
    assert torch.allclose(t @ t_inv, torch.eye(features, dtype=torch.float64), atol=1e-6)
    from masquant.methods.cmc import FAST_MIN, whitening_basis
    # a cached basis is one d x d matrix plus, below FAST_MIN, the eigendecomposition's inverse factor
    assert (whitening_basis(dead.T @ dead, 1e-4)[1] is None) == (features >= FAST_MIN)


def test_whitening_of_smoothed_activations_from_the_unsmoothed_covariance():
    """One eigendecomposition of X^T X serves every smoothing vector: T^T T is the covariance of
    X / s (ridge applied before smoothing), and the truncation it gives is the optimum for X / s."""
    x = anisotropic_activations()
    s = torch.rand(24, dtype=torch.float64) + 0.5
    t, t_inv = whitening(x.T @ x, smooth=s)
    smoothed = (x / s).T @ (x / s)
    assert torch.allclose(t.T @ t, smoothed, rtol=1e-8, atol=1e-8 * float(smoothed.abs().max()))
    assert torch.allclose(t @ t_inv, torch.eye(24, dtype=torch.float64), atol=1e-8)
    ridged, _ = whitening(x.T @ x, ridge=1e-2, smooth=s)
    damp = 1e-2 * float((x.T @ x).diagonal().mean())
    assert torch.allclose(ridged.T @ ridged, smoothed + torch.diag(damp / s**2), rtol=1e-8,
                          atol=1e-8 * float(smoothed.abs().max()))
    delta_w = torch.randn(40, 24, dtype=torch.float64)
    patch = low_rank_patch(delta_w, 6, whitener=(t, t_inv))
    optimum = float(torch.linalg.svdvals((x / s) @ delta_w.T)[6:].pow(2).sum().sqrt())
    assert output_error(x / s, delta_w, patch) == pytest.approx(optimum, rel=1e-6, abs=1e-9)


@pytest.mark.reliability(
    case='rank larger than the layer',
    expect='clamped to full rank (exact compensation) with a warning')
def test_rank_resolution():
    assert resolve_rank(32, 64, 128) == 32
    assert resolve_rank(0.25, 64, 128) == 16
    assert resolve_rank(0, 64, 128) == 0
    assert resolve_rank(500, 64, 128) == 64  # clamped to full rank, with a warning


def test_the_reference_rank_rule_is_a_ratio_with_a_floor():
    """The reference implementation's rule: max(round(ratio * min(in, out)), floor), at most full rank."""
    rule = "ratio:0.05,floor:32"
    assert resolve_rank(rule, 2048, 11008) == 102  # 3B-wide MLP: the ratio decides
    assert resolve_rank(rule, 256, 768) == 32  # a reference model's layer: the floor decides
    assert resolve_rank(rule, 16, 64) == 16  # never above full rank
    assert resolve_rank("ratio:0.1", 256, 768) == 26
    config = QuantConfig(method="masquant", rank=rule)
    assert QuantConfig.from_dict(config.to_dict()) == config
    for bad in ("ratio:2", "floor:32", "ratio:0.1,floor", "ratio:0.1,flr:3", "ratio:x"):
        with pytest.raises(ValueError, match="rank rule"):
            QuantConfig(method="masquant", rank=bad)


def test_a_rank_rule_sizes_each_patch_by_its_layer(vl_model, fresh):
    import masquant

    from conftest import vl_samples

    model = fresh(vl_model)
    masquant.quantize(model, vl_samples(range(3)), QuantConfig(method="masquant", w_bits=4, epochs=1,
                                                               rank="ratio:0.25,floor:4"), progress=False)
    ranks = {(m.in_features, m.out_features): {int(p.l1.shape[1]) for p in m.patches.values()}
             for m in model.modules() if isinstance(m, QuantLinear) and m.patches}
    assert ranks and all(r == {max(round(0.25 * min(k)), 4)} for k, r in ranks.items())


def _vision_site(x):
    stats = ChannelStats.empty(x.shape[1], True, x.device)
    stats.update(x)
    return SiteStats({Modality.VISION: stats})


@pytest.mark.parametrize("residual", ["fp", "quantized"])
def test_full_rank_reproduces_the_smoothed_weight_for_that_modality(residual):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    x = anisotropic_activations().float()
    smooth = torch.ones(NUM_MODALITIES, 24)
    smooth[Modality.TEXT] = torch.rand(24) + 0.5
    smooth[Modality.VISION] = torch.rand(24) * 3 + 0.1
    config = QuantConfig(method="masquant", w_bits=4, a_bits=16, rank=1.0, residual=residual, ridge=0.0,
                         patch_dtype="float32")
    router = ModalityRouter({})
    q = QuantLinear.from_linear(linear, smooth, config, router)
    info = compensate_linear(q, linear, _vision_site(x), config)
    assert info["vision"]["rank"] == 16
    with router.scope(torch.full((x.shape[0],), int(Modality.VISION))), torch.no_grad():
        y = q(x)
    if residual == "fp":
        expected = linear(x)  # (x/s_v) (W s_v)^T + b == x W^T + b
    else:
        expected = (x / smooth[Modality.VISION]) @ q.quantize_smoothed(linear.weight, Modality.VISION).dequantize().T
        expected = expected + linear.bias
    assert torch.allclose(y, expected.detach(), rtol=1e-4, atol=1e-4)
    # text tokens are untouched by the patch
    with router.scope(torch.zeros(x.shape[0], dtype=torch.long)), torch.no_grad():
        y_text = q(x)
    assert torch.allclose(y_text, torch.nn.functional.linear(x / smooth[0], q.dequantized_weight(), linear.bias))


@pytest.mark.parametrize(("dtype", "itemsize"), [("float16", 2), ("bfloat16", 2), ("float32", 4)])
def test_patch_bytes_are_reported_next_to_the_weight(dtype, itemsize):
    linear = torch.nn.Linear(64, 32)
    smooth = torch.ones(NUM_MODALITIES, 64)
    smooth[Modality.VISION] = 2.0
    config = QuantConfig(method="masquant", w_bits=4, rank=8, patch_dtype=dtype)
    q = QuantLinear.from_linear(linear, smooth, config, ModalityRouter({}))
    info = compensate_linear(q, linear, _vision_site(anisotropic_activations(features=64).float()), config)
    storage = q.storage_bytes()
    assert storage["patches"] == info["vision"]["patch_bytes"] == 8 * (64 + 32) * itemsize
    assert q.patches["vision"].l1.dtype == getattr(torch, dtype)
    assert storage["weight"] == 64 * 32 // 2 + 2 * 32 * 4  # 4-bit codes packed + fp32 scale/zero


def test_half_precision_patch_keeps_almost_all_of_the_correction():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    x = anisotropic_activations().float()
    smooth = torch.ones(NUM_MODALITIES, 24)
    smooth[Modality.VISION] = torch.rand(24) * 3 + 0.1
    errors = {}
    for dtype in ("float32", "float16", "bfloat16"):
        config = QuantConfig(method="masquant", w_bits=4, a_bits=16, rank=1.0, ridge=0.0, patch_dtype=dtype)
        router = ModalityRouter({})
        q = QuantLinear.from_linear(linear, smooth, config, router)
        compensate_linear(q, linear, _vision_site(x), config)
        with router.scope(torch.full((x.shape[0],), int(Modality.VISION))), torch.no_grad():
            errors[dtype] = (q(x) - linear(x)).pow(2).mean().item()
        if dtype == "float32":
            q.patches.clear()
            with router.scope(torch.full((x.shape[0],), int(Modality.VISION))), torch.no_grad():
                errors["none"] = (q(x) - linear(x)).pow(2).mean().item()
    assert errors["float32"] < 1e-8
    assert errors["float16"] < 1e-3 * errors["none"]
    assert errors["bfloat16"] < 3e-2 * errors["none"]


@pytest.mark.reliability(
    case='plain-SVD ablation with a singular covariance; zero residual',
    expect='patch computed, whitened spectrum left empty; no patch for a zero residual')
def test_plain_svd_ablation_survives_a_singular_covariance_and_zero_residuals_get_no_patch():
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)  # 8 tokens for 32 channels: singular covariance
    smooth = torch.ones(NUM_MODALITIES, 32)
    smooth[Modality.VISION] = 2.0
    plain = QuantConfig(method="masquant", w_bits=4, rank=4, whiten=False, ridge=0.0)
    q = QuantLinear.from_linear(linear, smooth, plain, ModalityRouter({}))
    info = compensate_linear(q, linear, _vision_site(x), plain)
    assert "vision" in q.patches and info["vision"]["whitened_energy_kept"] is None
    with pytest.raises(ValueError, match="singular"):  # the whitened default says what to do instead
        whitened = QuantConfig(method="masquant", w_bits=4, rank=4, ridge=0.0)
        compensate_linear(QuantLinear.from_linear(linear, smooth, whitened, ModalityRouter({})), linear,
                          _vision_site(x), whitened)
    # the vision vector equals the text one and the residual is taken against the quantized weight: nothing to add
    same = QuantConfig(method="masquant", w_bits=4, rank=4, residual="quantized")
    q = QuantLinear.from_linear(linear, torch.ones(NUM_MODALITIES, 32), same, ModalityRouter({}))
    info = compensate_linear(q, linear, _vision_site(torch.randn(200, 32)), same)
    assert not q.patches and info["vision"]["skipped"] == "zero residual"


def test_the_patch_cache_holds_no_reference_cycles():
    """Each layer's cache must be freed as soon as the layer is done (a cycle kept every layer's
    residuals alive until a garbage collection: calibration memory grew with depth)."""
    import gc

    linear = torch.nn.Linear(64, 32)
    smooth = torch.ones(NUM_MODALITIES, 64)
    smooth[Modality.VISION] = 2.0
    site = _vision_site(anisotropic_activations(features=64).float())
    for whiten in (True, False):
        config = QuantConfig(method="masquant", w_bits=4, rank=8, whiten=whiten)
        q = QuantLinear.from_linear(linear, smooth, config, ModalityRouter({}))
        gc.collect()
        gc.disable()
        try:
            cache = {}
            compensate_linear(q, linear, site, config, cache=cache, report=False)
            compensate_linear(q, linear, site, config, cache=cache, report=True)
            del cache
            assert gc.collect() == 0
        finally:
            gc.enable()


def test_a_residual_that_requires_grad_is_fitted_without_autograd():
    """A user's ``nn.Parameter`` residual: the large-matrix path hands the Gram matrix to SciPy,
    which needs a tensor outside autograd."""
    from masquant.methods import cmc as compensation

    features = compensation.FAST_MIN
    x = anisotropic_activations(tokens=3 * features, features=features, seed=5)
    delta_w = torch.nn.Parameter(torch.randn(features, features, dtype=torch.float64))
    patch = low_rank_patch(delta_w, 8, x.T @ x)
    assert not patch.l1.requires_grad and patch.l1.shape == (features, 8)
    assert 0 < compensation.spectrum(delta_w, 8)[1] < 1


def test_the_reference_models_stay_below_the_large_matrix_path():
    """docs/results/RESULTS.md was calibrated before CMC's large-matrix path existed: every linear of the
    reference models must read fewer than FAST_MIN channels, so that they compute exactly what
    they computed then (lowering FAST_MIN below 768 would silently move the published rows)."""
    from masquant.methods.cmc import FAST_MIN
    from masquant.refmodels.train import TEXT

    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    widths = (TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_attention_heads"] * head_dim)
    assert max(widths) == 768 and max(widths) < FAST_MIN
