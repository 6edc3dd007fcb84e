"""The native integer kernel (``masquant.runtime.native``): bit-identity with the eager kernels (its
AVX-512 VNNI code and its plain C++ loops), when ``QuantLinear`` takes it, and its fallbacks."""

import pytest
import torch

import masquant
from masquant.runtime.kernels import int_linear, quantize_tokens

from conftest import needs_native, set_switch


@needs_native
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (1, 7, 5), (2, 64, 33), (3, 300, 17), (1, 256, 768),
                                           (6, 40, 70), (37, 256, 130), (5, 1030, 1041)])
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize(("per_row", "with_bias"), [(True, True), (False, False)])
def test_native_kernel_is_bit_identical_to_the_eager_kernels(m, k, n, bits, per_row, with_bias, kernel_library):
    """The native kernel: the eager kernels' exact float32 values (codes, int32 sums, epilogue in
    the same order), for odd widths (vector tails, partial blocks of outputs and rows), a weight
    large enough for the threads to share its output blocks, a row of
    zeros (the scale's floor), exact halves (round to even), huge and tiny rows, per-row or
    per-tensor weight scales, with and without bias; each row by its own smoothing vector."""
    from masquant.runtime import native

    g = torch.Generator().manual_seed(m * 1000 + k + n + bits)
    x = torch.randn(m, k, generator=g) * torch.logspace(-20, 20, m)[:, None]
    x[0, : k // 2] = 0
    if m > 1:
        x[1] = 0
    if m > 2 and k >= 4:  # exact halves (the scale is 1): rounding goes to even, as torch.round does
        x[2] = 0
        x[2, :4] = torch.tensor([2.0 ** (bits - 1) - 1, 2.5, -3.5, 0.5])
    weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(n if per_row else 1, 1, generator=g) + 1e-3
    bias = torch.randn(n, generator=g) if with_bias else None
    expected = int_linear(*quantize_tokens(x, bits), weight, weight_scale, None, 0 if per_row else -1, bias)
    sums = weight.sum(1, dtype=torch.int32)
    plan = native.Plan(weight, weight, weight_scale, bias, None, bits, sums, lib=kernel_library)
    assert torch.equal(plan(x), expected)
    if kernel_library is native.library():
        assert torch.equal(native.int_linear(x, bits, weight, weight_scale, bias), expected)

    table = torch.rand(3, k, generator=g) + 0.25  # routed: each row divided by the vector its id names
    ids = torch.randint(0, 3, (m,), generator=g)
    smoothed = x / table[0]
    for modality in (1, 2):  # as QuantLinear.smoothed_input does it
        smoothed[ids == modality] = x[ids == modality] / table[modality]
    expected = int_linear(*quantize_tokens(smoothed, bits), weight, weight_scale, None, 0 if per_row else -1, bias)
    plan = native.Plan(weight, weight, weight_scale, bias, table, bits, sums, lib=kernel_library)
    assert torch.equal(plan(x, ids), expected)
    if m:
        assert torch.equal(plan(x), int_linear(*quantize_tokens(x / table[0], bits), weight, weight_scale, None,
                                               0 if per_row else -1, bias))  # (no ids: row 0 for all)


@needs_native
def test_ids_outside_the_smoothing_table_are_an_error():
    """An id that names no smoothing vector is refused before anything is read (no read past the table)."""
    from masquant.runtime import native

    weight = torch.ones(4, 8, dtype=torch.int8)
    plan = native.Plan(weight, weight, torch.ones(4, 1), None, torch.ones(2, 8), 8, weight.sum(1, dtype=torch.int32))
    for bad in (2, -1):
        with pytest.raises(ValueError, match=r"must index the layer's 2 smoothing vectors"):
            plan(torch.randn(3, 8), torch.tensor([0, bad, 1]))


@pytest.fixture
def native_calls(monkeypatch):
    """The ids argument of every ``native.Plan`` call, in order (None: row 0 of the table for all)."""
    from masquant.runtime import native

    calls = []
    real = native.Plan.__call__

    def spy(plan, rows, ids=None):
        calls.append(ids)
        return real(plan, rows, ids)

    monkeypatch.setattr(native.Plan, "__call__", spy)
    return calls


@needs_native
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("patched", [False, True])
def test_the_native_kernel_gives_the_eager_model(w_bits, patched, monkeypatch, native_calls):
    """A quantized model with routing (and patches) prefills (text and image rows: routed smoothing,
    patches added to the image rows) and decodes (one text token at a time) through the native
    kernel to the logits it gives with MASQUANT_NATIVE=0: exactly without patches, to float32
    rounding with them (the native patch products sum in another order than MKL's)."""
    from masquant.bench import speed

    calls = native_calls
    model = speed.synthetic_quantize(masquant.refmodels.tiny.tiny_qwen2_5_vl(hidden=64, layers=2), w_bits, rank=4)
    patched_layers = [layer for layer in model.modules() if getattr(layer, "patches", None)]
    for layer in patched_layers:
        for patch in layer.patches.values():
            patch.l1.mul_(30)  # (patches large enough to matter: synthetic ones are small)
        if not patched:
            layer.patches.clear()  # (routed smoothing alone)
    sample = masquant.refmodels.tiny.tiny_sample(0, "vl")
    with torch.no_grad():
        fast = model.generate(**sample, max_new_tokens=3, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        assert any(ids is not None and 1 in ids.tolist() for ids in calls)  # routed prefill rows
        assert any(ids is None for ids in calls)  # decoding (text rows) and layers without routing
        set_switch(monkeypatch, "MASQUANT_NATIVE", "0")
        calls.clear()
        eager = model.generate(**sample, max_new_tokens=3, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        assert not calls
        if patched:
            with_patches = model(**sample).logits
    assert torch.equal(fast.sequences, eager.sequences)
    for a, b in zip(fast.logits, eager.logits, strict=True):
        if patched:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        else:
            assert torch.equal(a, b)
    if patched:  # (the patches moved the logits far more than the tolerance)
        for layer in patched_layers:
            layer.patches.clear()
        with torch.no_grad():
            assert float((model(**sample).logits - with_patches).abs().max()) > 1e-3 * float(with_patches.abs().max())


def test_a_failing_native_build_falls_back_to_the_eager_kernels(monkeypatch, tmp_path, caplog):
    """A compiler that fails: one warning, the eager kernels, the same values; nothing cached."""
    from masquant.bench import speed
    from masquant.runtime import native

    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 1\n")
    broken.chmod(0o755)
    set_switch(monkeypatch, "CXX", str(broken))
    set_switch(monkeypatch, "XDG_CACHE_HOME", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        layer = speed.quant_linear(torch.nn.Linear(32, 16), 8)
        x = torch.randn(1, 32)
        with caplog.at_level("WARNING", logger="masquant"), torch.no_grad():
            y = layer(x)
        assert native.library() is None and not native.usable(x, 16)
        assert native.describe() == "unavailable (eager kernels)"
        assert "native integer kernel could not be built" in caplog.text
        assert "simulated compiler failure" in caplog.text
        assert torch.equal(y, int_linear(*quantize_tokens(x, 8), layer.qweight.int8(), layer.qweight.scale, None, 0,
                                         layer.bias))
        assert not list((tmp_path / "cache" / "masquant").glob("*.so"))
    finally:
        native._library.cache_clear()


@needs_native
@pytest.mark.parametrize("w_bits", [8, 4])
def test_the_native_call_follows_state_dict_loads_copies_and_the_runtime(w_bits):
    """The native call binds a layer's tensors once; loading other weights into the layer, a
    deep copy, a pickle and switching to the fake runtime all give what the general path gives."""
    import copy
    import pickle

    from masquant.bench import speed
    from masquant.runtime import native

    def layer(seed):
        torch.manual_seed(seed)
        return speed.quant_linear(torch.nn.Linear(48, 40), w_bits)

    a, b = layer(0), layer(1)
    x = torch.randn(2, 48)
    with torch.no_grad():
        before = a(x)
        assert isinstance(a._plan, native.Plan)
        a.load_state_dict(b.state_dict())
        after = a(x)
        twin = copy.deepcopy(a)
        assert twin._plan is None and pickle.loads(pickle.dumps(a))._plan is None
        copied = twin(x)
        a.runtime = "fake"
        fake = a(x)
    old = a.qweight.__getstate__()  # an IntWeight pickled before its derived-tensor cache existed
    del old["_derived"]
    revived = type(a.qweight).__new__(type(a.qweight))
    revived.__setstate__(dict(old))
    assert torch.equal(revived.native_codes(), native.pack(a.qweight.int8()))
    general = int_linear(*quantize_tokens(x, 8), b.qweight.int8(), b.qweight.scale, None, 0, b.bias)
    sums = a.qweight.row_sums()  # cached (a full pass over the weight), and follows the load
    assert sums is a.qweight.row_sums() and torch.equal(sums, b.qweight.int8().sum(1, dtype=torch.int32))
    assert not torch.equal(before, after)
    assert torch.equal(after, general) and torch.equal(copied, general)
    assert float((fake - general).norm() / general.norm()) < 1e-5


@needs_native
def test_small_layers_and_decoding_rows_of_large_ones_take_the_native_call(monkeypatch):
    """Few rows of a small layer go native; a large layer (3B-wide) goes native for decoding's
    few rows, its output blocks shared among the threads, and to the GEMMs for more. Values
    identical either way, on one thread or two."""
    from masquant.bench import speed
    from masquant.runtime import native

    isa = native.library().isa
    assert native.describe() == native.ISAS[isa]
    max_weight, max_macs = native.LIMITS[isa]
    assert native.small(max_macs // max_weight, 1, max_weight) and native.small(1, 1024, max_weight // 1024)
    assert not native.small(max_macs // 256 + 1, 16, 16)
    decode = native.DECODE_ROWS[isa]
    assert native.small(decode, 2048, 2048) == (decode > 0) and not native.small(decode + 1, 2048, 11008)
    torch.manual_seed(0)
    small, large = speed.quant_linear(torch.nn.Linear(256, 512), 8), speed.quant_linear(torch.nn.Linear(2048, 2048), 8)
    inputs = [torch.randn(1, 1, 256), torch.randn(1, max(decode, 1), 2048), torch.randn(1, decode + 1, 2048)]
    layers = (small, large, large)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(2)
            outputs = [layer(x) for layer, x in zip(layers, inputs, strict=True)]
            assert isinstance(small._plan, native.Plan) and (large._plan is not None) == (decode > 0)
            torch.set_num_threads(1)
            assert torch.equal(large(inputs[1]), outputs[1])
            set_switch(monkeypatch, "MASQUANT_NATIVE", "0")
            assert native.describe() == "off (MASQUANT_NATIVE=0)"
            for layer, x, y in zip(layers, inputs, outputs, strict=True):
                assert torch.equal(layer(x), y)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_a_bf16_layer_decodes_natively_with_the_eager_values(monkeypatch):
    """A bfloat16 model's linears (the general path: rows converted to float32) take the native
    kernel for one row too, with the eager kernels' values."""
    from masquant.bench import speed
    from masquant.runtime import native

    torch.manual_seed(0)
    layer = speed.quant_linear(torch.nn.Linear(512, 300).to(torch.bfloat16), 8)
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    calls = []
    real = native.int_linear
    monkeypatch.setattr(native, "int_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = layer(x)
        set_switch(monkeypatch, "MASQUANT_NATIVE", "0")
        eager = layer(x)
    assert calls and fast.dtype == torch.bfloat16 and torch.equal(fast, eager)


@needs_native
def test_the_native_kernel_refuses_tensors_off_the_cpu():
    """It reads raw CPU pointers: a weight elsewhere is a clear error, never a read of device memory."""
    from masquant.bench import speed
    from masquant.runtime import native

    weight = torch.empty(4, 8, dtype=torch.int8, device="meta")
    with pytest.raises(ValueError, match=r"tensors on \['meta'\]: move the model and its inputs to one device"):
        native.int_linear(torch.randn(1, 8), 8, weight, torch.ones(4, 1), None)
    layer = speed.quant_linear(torch.nn.Linear(8, 4), 8)
    with torch.no_grad():
        layer(torch.randn(1, 8))  # (a plan bound to CPU tensors)
        layer.to("meta")
        with pytest.raises(ValueError, match="one device"):  # the plan is not reused: the general path says so
            layer(torch.randn(1, 8))
    assert layer._plan is None or layer._plan.tensors[0].device.type == "cpu"


@needs_native
def test_torch_compile_of_a_quantized_model_traces_the_eager_kernels(native_calls, recwarn):
    """Inside ``torch.compile`` the native call steps aside (dynamo cannot trace a ctypes call, and
    would trace the library's cached build instead): the compiled model runs the eager integer
    kernels, with the eager model's logits up to float rounding."""
    from masquant.bench import speed
    from masquant.refmodels import tiny

    calls = native_calls
    torch.manual_seed(0)
    model = speed.synthetic_quantize(tiny.tiny_qwen2_5_vl(hidden=64, layers=2), 8, rank=4)
    sample = tiny.tiny_sample(0, "vl")
    with torch.no_grad():
        eager = model(**sample).logits
        assert calls
        calls.clear()
        compiled = torch.compile(model)(**sample).logits
    assert not calls
    assert not [w for w in recwarn if "lru_cache" in str(w.message)]  # (dynamo never reached native.library)
    assert float((compiled - eager).abs().max()) < 1e-4 * float(eager.abs().max())


@needs_native
def test_infinite_rows_and_any_ids_give_what_the_eager_kernels_give(kernel_library):
    """A row with an infinite entry (its scale is inf, so inf / inf codes are NaN: code 0 in torch)
    gives the eager kernels' NaN row on every instruction set; ids of any integer dtype or a
    strided view are read as int64 (never past their buffer)."""
    from masquant.runtime import native

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 20, generator=g)
    x[1, 3], x[3, 0] = float("inf"), float("-inf")
    weight = torch.randint(-128, 128, (24, 20), generator=g, dtype=torch.int8)
    scale, sums = torch.rand(24, 1, generator=g) + 0.1, weight.sum(1, dtype=torch.int32)
    expected = int_linear(*quantize_tokens(x, 8), weight, scale, None, 0, None)
    got = native.Plan(weight, weight, scale, None, None, 8, sums, lib=kernel_library)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert got[1].isnan().all() and got[0].isfinite().all()

    table = torch.rand(3, 20, generator=g) + 0.5
    plan = native.Plan(weight, weight, scale, None, table, 8, sums, lib=kernel_library)
    ids = torch.tensor([0, 2, 1, 2, 0, 9, 9, 9, 9, 9])[:5]
    reference = plan(x[[0, 2, 4]], ids[[0, 2, 4]])
    for variant in (ids.int(), ids.to(torch.uint8), torch.stack([ids, ids], 1)[:, 0]):
        torch.testing.assert_close(plan(x, variant)[[0, 2, 4]], reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="4 modality ids for 5 rows"):
        plan(x, ids[:4])


@needs_native
def test_inputs_of_the_wrong_width_or_layout_are_errors_not_reads():
    """The kernel reads raw memory: a row of another width, a strided or a float64 input is a clear
    error (from the layer too, which never reshapes rows of the wrong width into the right one)."""
    from masquant.bench import speed
    from masquant.runtime import native

    weight = torch.ones(4, 8, dtype=torch.int8)
    plan = native.Plan(weight, weight, torch.ones(4, 1), None, None, 8, weight.sum(1, dtype=torch.int32))
    for bad in (torch.randn(4, 4), torch.randn(8, 4).T, torch.randn(2, 8, dtype=torch.float64)):
        with pytest.raises(ValueError, match="contiguous float32 rows of 8 features"):
            plan(bad)
    with pytest.raises(ValueError, match="reads weight_scale as contiguous float32"):
        native.Plan(weight, weight, torch.ones(4, 2)[:, :1], None, None, 8, weight.sum(1, dtype=torch.int32))
    layer = speed.quant_linear(torch.nn.Linear(8, 4), 8)
    with torch.no_grad(), pytest.raises(ValueError, match="takes 8 input features, got input of shape"):
        layer(torch.randn(4, 4))


@needs_native
def test_a_plan_follows_storage_moved_under_the_same_tensor():
    """``share_memory_()`` moves a buffer's storage without replacing the tensor: the layer binds a
    new plan instead of reading the freed address."""
    from masquant.bench import speed

    layer = speed.quant_linear(torch.nn.Linear(32, 16), 8)
    x = torch.randn(2, 32)
    with torch.no_grad():
        before, plan = layer(x), layer._plan
        layer.qweight.scale.share_memory_()
        after = layer(x)
    assert layer._plan is not plan and torch.equal(before, after)
