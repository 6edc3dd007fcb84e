"""MASQuant's patches in the native kernel (``masquant.runtime.native``): the low-rank products on every
instruction set, and a plan that never applies a patch the layer no longer has (removed, changed,
moved, its smoothing table edited), agreeing with the general path."""

import pytest
import torch

from conftest import needs_native, set_switch


@needs_native
@pytest.mark.parametrize(("m", "k", "n", "rank"), [(1, 1, 1, 1), (5, 7, 70, 5), (9, 64, 33, 16), (13, 256, 130, 33),
                                                   (37, 40, 256, 70)])
def test_native_patches_are_the_low_rank_products_of_their_rows(m, k, n, rank, kernel_library):
    """Patches in the native call: each row whose id has a patch gets ``(x @ down) @ up`` added (x
    unsmoothed: the smoothing is folded into ``down``), equal to the products in float64 to float32
    rounding, on every instruction set (row tails, masked rank and output chunks, runs of ids);
    rows of other ids, and every row of a call without ids, are the integer linear alone, bit for
    bit. The same rows give the same values whichever call they are in (fixed summation order)."""
    from masquant.runtime import native

    g = torch.Generator().manual_seed(m + k + n + rank)
    x = torch.randn(m, k, generator=g)
    weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale, sums = torch.rand(n, 1, generator=g) + 0.1, weight.sum(1, dtype=torch.int32)
    bias = torch.randn(n, generator=g)
    table = torch.rand(3, k, generator=g) + 0.25
    factors = {row: (torch.randn(k, rank, generator=g), torch.randn(rank, n, generator=g)) for row in (1, 2)}
    ids = torch.randint(0, 3, (m,), generator=g)
    if m > 3:
        ids[1:4] = 1  # a run of one modality's rows
    unpatched = native.Plan(weight, weight, scale, bias, table, 8, sums, lib=kernel_library)(x, ids)
    plan = native.Plan(weight, weight, scale, bias, table, 8, sums, lib=kernel_library, patches=factors)
    got = plan(x, ids)
    expected = unpatched.double()
    for row, (down, up) in factors.items():
        rows = ids == row
        expected[rows] += (x[rows].double() @ down.double()) @ up.double()
    text = ids == 0
    assert torch.equal(got[text], unpatched[text])
    tol = 1e-5 * float(expected.abs().max()) * max(k, rank) ** 0.5
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)
    if (~text).any():
        assert float((got - unpatched).abs().max()) > 100 * tol  # (the patches are there)
    assert torch.equal(plan(x), native.Plan(weight, weight, scale, bias, table, 8, sums, lib=kernel_library)(x))
    for r in range(m):  # one row at a time: the same values
        assert torch.equal(plan(x[r:r + 1].contiguous(), ids[r:r + 1]), got[r:r + 1])
    with pytest.raises(ValueError, match="patch factors must be float32"):
        native.Plan(weight, weight, scale, bias, table, 8, sums, patches={1: (factors[1][0].double(), factors[1][1])})
    with pytest.raises(ValueError, match="smoothing table has 0 rows"):
        native.Plan(weight, weight, scale, bias, None, 8, sums, patches=factors)


@needs_native
def test_a_plan_follows_its_layers_patches_and_smoothing(monkeypatch):
    """A plan folds the patches with the smoothing table once: a patch changed in place, a new
    patch or a new smoothing table (set_smoothing) binds a new plan, with the general path's values."""
    from masquant.bench import speed
    from masquant.modality import Modality
    from masquant.refmodels import tiny
    from masquant.runtime import native

    torch.manual_seed(0)
    model = speed.synthetic_quantize(tiny.tiny_qwen2_5_vl(hidden=64, layers=1), 8, rank=4)
    layer = next(m for m in model.modules() if getattr(m, "patches", None))
    sample = tiny.tiny_sample(0, "vl")

    def both():
        with torch.no_grad():
            fast = model(**sample).logits
            set_switch(monkeypatch, "MASQUANT_NATIVE", "0")
            eager = model(**sample).logits
            set_switch(monkeypatch, "MASQUANT_NATIVE", None)
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
        return fast

    before, plan = both(), layer._plan
    assert isinstance(plan, native.Plan) and plan._layer.patches
    layer.patches["vision"].l1.mul_(50)
    changed = both()
    assert layer._plan is not plan and not torch.equal(before, changed)
    layer.add_patch(Modality.VISION, torch.randn(64, 2), torch.randn(2, layer.out_features))
    assert not torch.equal(both(), changed)
    smooth = layer.smooth.clone()
    smooth[int(Modality.VISION)] *= 2
    plan = layer._plan
    layer.set_smoothing(smooth)
    both()
    assert layer._plan is not plan


def _routed_layer(smooth=None):
    from masquant.config import QuantConfig
    from masquant.modality import ModalityRouter
    from masquant.runtime.qlinear import QuantLinear

    router = ModalityRouter({})
    smooth = torch.rand(3, 64) + 0.5 if smooth is None else smooth
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 48), smooth, QuantConfig(w_bits=8), router)
    return layer, router


def _native_and_eager(layer, router, monkeypatch, x, ids):
    with torch.no_grad(), router.scope(ids):
        fast = layer(x)
        set_switch(monkeypatch, "MASQUANT_NATIVE", "0")
        eager = layer(x)
        set_switch(monkeypatch, "MASQUANT_NATIVE", None)
    return fast, eager


@needs_native
@pytest.mark.parametrize("change", ["clear", "delete", "re-add", "swap data", "share memory (float32)"])
def test_a_plan_never_applies_a_patch_the_layer_no_longer_has(change, monkeypatch):
    """Patches removed, re-added (new tensors, possibly at the old addresses), their storage
    swapped (``.data``) or moved (``share_memory_`` of float32 factors, which the plan must not
    read in place): the native call gives the general path's values, never the old patch's."""
    from masquant.modality import Modality

    torch.manual_seed(0)
    layer, router = _routed_layer()
    dtype = torch.float32 if change.startswith("share") else torch.float16
    x, ids = torch.randn(1, 6, 64), torch.tensor([[0, 1, 1, 1, 0, 0]])
    rounds = 50 if change == "re-add" else 1
    for i in range(rounds):
        layer.add_patch(Modality.VISION, torch.randn(64, 4) * (i + 1), torch.randn(4, 48), dtype=dtype)
        _native_and_eager(layer, router, monkeypatch, x, ids)
        patch = layer.patches["vision"]
        if change == "clear":
            layer.patches.clear()
        elif change in ("delete", "re-add"):
            del layer.patches["vision"]
        elif change == "swap data":
            patch.l1.data = torch.randn(64, 4, dtype=patch.l1.dtype) * 100
        else:
            plan = layer._plan
            patch.l2.share_memory_()  # (new storage, same tensor, same version: the old one is freed)
        fast, eager = _native_and_eager(layer, router, monkeypatch, x, ids)
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
        if change.startswith("share"):
            storage = patch.l2.untyped_storage().data_ptr()
            assert layer._plan is not plan
            assert all(t.untyped_storage().data_ptr() != storage for t in layer._plan.tensors[7][1])


@needs_native
@pytest.mark.parametrize("start", ["ones", "uniform", "routed"])
def test_a_smoothing_table_edited_in_place_is_read_alike_by_both_paths(start, monkeypatch):
    """The flags derived from the table (uniform, unsmoothed) follow an in-place edit made without
    ``set_smoothing`` on the next forward, so the native and general paths agree."""
    from masquant.modality import Modality

    torch.manual_seed(0)
    table = {"ones": torch.ones(3, 64), "uniform": (torch.rand(1, 64) + 0.5).repeat(3, 1),
             "routed": torch.rand(3, 64) + 0.5}[start]
    layer, router = _routed_layer(smooth=table)
    layer.add_patch(Modality.VISION, torch.randn(64, 4), torch.randn(4, 48))
    x, ids = torch.randn(1, 6, 64), torch.tensor([[0, 1, 1, 1, 0, 0]])
    before, _ = _native_and_eager(layer, router, monkeypatch, x, ids)
    with torch.no_grad():
        layer.smooth[int(Modality.VISION)] *= 4
    fast, eager = _native_and_eager(layer, router, monkeypatch, x, ids)
    assert not layer.uniform and not torch.equal(fast, before)
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))


def test_an_unknown_patch_name_is_refused_on_every_path():
    """Patches are named by modality (text included) or 'all': a layout (checkpoint) or a module dict
    holding another name is an error, not a patch one path applies and the other skips."""
    from masquant.config import QuantConfig
    from masquant.runtime.qlinear import LowRankPatch, QuantLinear

    layout = {"in_features": 8, "out_features": 4, "bias": False, "dtype": "float32", "patches": {"speech": 2},
              "modality_weights": []}
    with pytest.raises(ValueError, match="patches are named by modality"):
        QuantLinear.from_layout(layout, QuantConfig(method="masquant", w_bits=8), None)
    layer, router = _routed_layer()
    layer.patches["speech"] = LowRankPatch(torch.randn(64, 2), torch.randn(2, 48))
    with torch.no_grad(), router.scope(torch.tensor([[0, 1]])), \
            pytest.raises(ValueError, match="patches are named by modality"):
        layer(torch.randn(1, 2, 64))


def test_the_smoothing_flags_check_does_not_break_a_compiled_graph():
    """``_sync_flags`` reads the table's version counter, on which dynamo cannot guard: inside
    ``torch.compile`` it steps aside, so a quantized linear still traces as one graph."""
    import torch._dynamo as dynamo

    from masquant.bench import speed

    torch.manual_seed(0)
    layer = speed.quant_linear(torch.nn.Linear(64, 32), 8)
    with torch.no_grad():
        explained = dynamo.explain(layer)(torch.randn(3, 64))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
