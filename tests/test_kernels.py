"""The integer runtime: packing, exact int32 GEMMs, and equivalence with the fake-quant path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import masquant
from masquant import QuantConfig, QuantLinear
from masquant.config import options_for
from masquant.runtime import kernels
from masquant.runtime.kernels import int_linear, int_matmul, pack_int4, quantize_tokens, unpack_int4
from masquant.runtime.primitives import IntGrid, fake_quantize_per_token, quantize_weight
from masquant.runtime.qlinear import IntWeight, set_runtime

from conftest import omni_samples, set_switch


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(1, 33), seed=st.integers(0, 2**16))
def test_int4_packing_round_trips_and_halves_the_bytes(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (rows, width), generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (width + 1) // 2)
    assert torch.equal(unpack_int4(packed, width), codes)


def test_packing_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[9]], dtype=torch.int8))


@pytest.mark.parametrize(("m", "k", "n"), [(1, 7, 5), (16, 64, 24), (33, 300, 17), (3, 1, 4), (17, 1, 33)])
def test_int_matmul_is_exact(m, k, n):
    """Exact int32 products, a single input too (torch's CPU ``_int_mm`` returns garbage there)."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(int_matmul(a, b).long(), a.long() @ b.long().T)


def test_token_codes_match_the_fake_quantizer():
    x = torch.randn(9, 40) * torch.logspace(-2, 2, 9)[:, None]
    for bits in (8, 6, 4):
        codes, scale = quantize_tokens(x, bits)
        assert codes.dtype == torch.int8
        assert torch.allclose(codes.float() * scale, fake_quantize_per_token(x, bits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_kernels_are_bit_identical_to_their_op_by_op_definition(dtype):
    """The eager kernels convert the int32 sums inside the scaling multiply; the values are
    exactly those of the op-by-op definition (float, then multiply), so a checkpoint's outputs
    and the published results do not move. Rows of zeros (the scale's floor), huge and tiny rows
    included."""
    from masquant.runtime.primitives import EPS

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(12, 96, generator=g) * torch.logspace(-30, 30, 12)[:, None]).to(dtype)
    x[0] = 0
    weight = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8)
    weight_scale, bias = torch.rand(40, 1, generator=g), torch.randn(40, generator=g)
    for bits in (8, 6, 4):
        codes, scale = quantize_tokens(x, bits)
        qmax = 2 ** (bits - 1) - 1
        ref_scale = x.float().abs().amax(-1, keepdim=True).clamp_min(EPS) / qmax
        ref_codes = torch.div(x.float(), ref_scale).round().clamp(-qmax - 1, qmax).to(torch.int8)
        assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes)
        y = int_linear(codes, scale, weight, weight_scale, None, 0, bias)
        ref = torch._int_mm(codes, weight.T).float() * scale * weight_scale.reshape(1, -1) + bias
        assert torch.equal(y, ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, -1, 16])
@pytest.mark.parametrize("w_bits", [8, 4, 3])
def test_int_linear_equals_the_dequantized_float_product(symmetric, group_size, w_bits):
    torch.manual_seed(0)
    w, x, bias = torch.randn(24, 64), torch.randn(10, 64), torch.randn(24)
    weight = IntWeight(24, 64, IntGrid(w_bits, symmetric), group_size)
    weight.set(quantize_weight(w, IntGrid(w_bits, symmetric), group_size))
    codes, scale = quantize_tokens(x, 8)
    y = int_linear(codes, scale, weight.int8(), weight.scale, None if symmetric else weight.zero, group_size, bias)
    expected = torch.nn.functional.linear(codes.float() * scale, weight.dequantize(torch.float64).float(), bias)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-4)
    # the stored weight decodes to the grid's dequantized values
    assert torch.allclose(weight.dequantize(torch.float32),
                          quantize_weight(w, IntGrid(w_bits, symmetric), group_size).dequantize(), atol=1e-6)


def test_the_unpacked_cache_follows_state_dict_loads():
    weight = IntWeight(4, 6, IntGrid(4), 0)
    weight.set(quantize_weight(torch.randn(4, 6), IntGrid(4)))
    before = weight.int8().clone()
    other = IntWeight(4, 6, IntGrid(4), 0)
    other.set(quantize_weight(torch.randn(4, 6) * 3, IntGrid(4)))
    weight.load_state_dict(other.state_dict())
    assert torch.equal(weight.int8(), other.int8()) and not torch.equal(weight.int8(), before)


SETTINGS = [(8, 8, 0, True), (4, 8, 0, True), (4, 6, 0, True), (4, 8, 32, False), (4, 16, 32, False)]


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "awq", "mbq", "mas", "masquant"])
@pytest.mark.parametrize(("w_bits", "a_bits", "group", "sym"), SETTINGS)
def test_integer_runtime_matches_fake_quantization(method, w_bits, a_bits, group, sym, omni_model, fresh,
                                                  monkeypatch):
    if method == "mbq" and a_bits == 16 and group:
        pytest.skip("covered by awq (same search)")
    qmodel = fresh(omni_model)
    config = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, w_group_size=group, w_symmetric=sym,
                         **options_for(method, epochs=1, rank=8, awq_grid=4))
    masquant.quantize(qmodel, omni_samples(range(2)), config, progress=False)
    assert {m.runtime for m in qmodel.modules() if isinstance(m, QuantLinear)} == {"int"}
    sample = omni_samples([500])[0]
    calls = []  # integer GEMMs: torch._int_mm, or the native kernel (few rows, small layers)
    native = masquant.runtime.native
    int_mm, plan_call, native_linear = torch._int_mm, native.Plan.__call__, native.int_linear
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(1) or int_mm(*a))
    monkeypatch.setattr(masquant.runtime.native.Plan, "__call__", lambda *a: calls.append(1) or plan_call(*a))
    monkeypatch.setattr(masquant.runtime.native, "int_linear", lambda *a: calls.append(1) or native_linear(*a))
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    inputs = {}
    def keep(name):
        def hook(module, args):
            inputs.setdefault(name, (args[0], module.router.ids))  # returns None: the inputs stay as they are
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad():
        y_int = qmodel(**sample).logits
        assert bool(calls) == (a_bits < 16)
        for hook in hooks:
            hook.remove()
        # every linear, on the same input: integer and fake paths agree to float rounding
        for name, layer in layers.items():
            x, ids = inputs[name]
            with layer.router.scope(ids):
                a = layer(x)
                layer.runtime = "fake"
                b = layer(x)
                layer.runtime = "int"
            assert float((a - b).norm() / b.norm()) < 1e-5, name
        calls.clear()
        set_runtime(qmodel, "fake")
        y_fake = qmodel(**sample).logits
        assert not calls
    # through the whole model, float rounding can flip a few activation codes in later layers
    err = (y_int - y_fake).norm() / y_fake.norm()
    assert err < 3e-3, f"{method} W{w_bits}A{a_bits}: relative difference {err:.2e}"


needs_fusion = pytest.mark.skipif(not kernels.fusion_available(torch.device("cpu")),
                                  reason="no C++ compiler for torch.compile on this machine")


@needs_fusion
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("routed", [True, False])
def test_fused_linear_equals_the_eager_kernels(dtype, bits, routed):
    """One compiled region (smooth by modality, per-token codes, int8 GEMM, epilogue, bias) gives
    the eager ``quantize_tokens`` + ``int_linear`` result: the same scales, codes that differ at
    float ties at most, hence outputs within a code's worth."""
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(37, 96, generator=gen) * torch.logspace(-2, 2, 37)[:, None]).to(dtype)
    smooth = torch.rand(3, 96, generator=gen) + 0.3
    ids = torch.randint(0, 3, (37,), generator=gen) if routed else None
    q = quantize_weight(torch.randn(24, 96, generator=gen), IntGrid(4, True))
    bias = torch.randn(24, generator=gen) if routed else None
    y = kernels.fused_linear(x, bits, smooth, ids, q.codes, q.scale, bias, dtype)
    body = kernels._routed_int_linear if routed else kernels._unrouted_int_linear
    assert body in kernels._compiled and "cpu" not in kernels._broken  # compiled, not the eager fallback
    rows = x.float() / (smooth[ids] if routed else smooth[0])
    codes, scale = quantize_tokens(rows, bits)
    ref = int_linear(codes, scale, q.codes, q.scale, None, 0, bias)
    assert y.dtype == dtype and y.shape == (37, 24)
    step = scale * q.scale.reshape(1, -1) * q.codes.abs().amax(1).reshape(1, -1).float()  # one code flipped
    tol = step + (ref.abs() * 1e-2 if dtype == torch.bfloat16 else 1e-5 * ref.abs())
    assert bool(((y.float() - ref).abs() <= tol + 1e-6).all())
    assert float((y.float() - ref).norm() / ref.norm()) < (4e-3 if dtype == torch.bfloat16 else 1e-5)


@needs_fusion
@pytest.mark.parametrize("runs", ["contiguous", "scattered"])
def test_quant_linear_fused_and_eager_agree_with_patches(runs, monkeypatch):
    from masquant.bench.speed import quant_linear
    from masquant.modality import ModalityRouter

    monkeypatch.setattr(kernels, "FUSE_MIN_ELEMENTS", 0)  # fuse even these few rows
    router = ModalityRouter({})
    layer = quant_linear(torch.nn.Linear(64, 48), 8, rank=4, router=router)
    x = torch.randn(2, 10, 64)
    ids = torch.zeros(2, 10, dtype=torch.long)
    if runs == "contiguous":
        ids[0, 3:8] = int(masquant.Modality.VISION)
    else:
        ids[:, ::3] = int(masquant.Modality.VISION)
    with router.scope(ids), torch.no_grad():
        assert kernels.use_fusion(x)
        fused = layer(x)
        assert "cpu" not in kernels._broken  # the fused region ran compiled
        set_switch(monkeypatch, "MASQUANT_FUSE", "0")
        eager = layer(x)
        layer.runtime = "fake"
        fake = layer(x)
    assert float((fused - eager).norm() / eager.norm()) < 1e-5
    assert float((fused - fake).norm() / fake.norm()) < 1e-5
    # the vision rows really got the patch and their own vector: text-only routing differs there
    with router.scope(torch.zeros_like(ids)), torch.no_grad():
        text_only = layer(x)
    vision = ids == int(masquant.Modality.VISION)
    assert not torch.allclose(text_only[vision], fused[vision]) and torch.allclose(text_only[~vision], fused[~vision],
                                                                                    atol=1e-5)


def test_a_failing_compiler_falls_back_to_the_eager_kernels(monkeypatch, caplog):
    set_switch(monkeypatch, "MASQUANT_FUSE", "1")
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_broken", set())

    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    x, smooth, ids = torch.randn(5, 16), torch.ones(3, 16), torch.zeros(5, dtype=torch.long)
    weight, w_scale = torch.randint(-7, 8, (8, 16), dtype=torch.int8), torch.rand(8, 1)
    with caplog.at_level("WARNING", logger="masquant"):
        y = kernels.fused_linear(x, 8, smooth, ids, weight, w_scale, None, torch.float32)
    codes, scale = quantize_tokens(x, 8)
    assert torch.equal(y, int_linear(codes, scale, weight, w_scale, None, 0, None))
    assert "fused kernels unavailable on cpu" in caplog.text and not kernels.fusion_available(torch.device("cpu"))
    set_switch(monkeypatch, "MASQUANT_FUSE", "yes")
    with pytest.raises(ValueError, match="MASQUANT_FUSE must be"):
        kernels.fusion_available(torch.device("cpu"))


@needs_fusion
def test_bf16_inputs_give_the_same_codes_fused_or_eager(monkeypatch):
    """Both paths smooth in float32, so whether an input reaches the fusion threshold does not
    change a bf16 model's output beyond the final rounding."""
    from masquant.bench.speed import quant_linear
    from masquant.modality import ModalityRouter

    router = ModalityRouter({})
    layer = quant_linear(torch.nn.Linear(64, 48), 8, rank=4, router=router).to(torch.bfloat16)
    x = torch.randn(30, 64).to(torch.bfloat16)
    ids = torch.zeros(30, dtype=torch.long)
    ids[10:20] = int(masquant.Modality.VISION)
    monkeypatch.setattr(kernels, "FUSE_MIN_ELEMENTS", 0)
    with router.scope(ids), torch.no_grad():
        fused = layer(x).float()
        set_switch(monkeypatch, "MASQUANT_FUSE", "0")
        eager = layer(x).float()
    assert torch.allclose(fused, eager, rtol=1e-2, atol=1e-2)
    assert float((fused - eager).norm() / eager.norm()) < 4e-3  # bf16 output rounding only


def _variant(x):
    return x * 2 + 1


@needs_fusion
def test_compiled_kernels_keep_more_variants_than_dynamos_default():
    """Past dynamo's default of 8 variants a function runs eagerly; ``kernels.compiled`` raises the
    limit so that every variant a quantized model needs is compiled (here: one per input rank)."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for ndim in range(1, 11):
        x = torch.randn(*[2] * ndim)
        assert torch.equal(kernels.compiled(_variant, x.device, x), _variant(x))
    assert counters["stats"]["unique_graphs"] - before == 10
