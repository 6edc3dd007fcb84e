"""The kernel choice: measured once per process, and each choice gives the integer path's values."""

import pytest
import torch

import masquant
from masquant import QuantConfig, QuantLinear
from masquant.config import options_for
from masquant.runtime import dispatch

from conftest import omni_samples, set_switch


@pytest.mark.filterwarnings("ignore::UserWarning")  # (torch.backends.mkldnn.flags says TF32 is for Intel GPUs)
def test_the_probe_sees_pytorchs_plain_integer_loops(monkeypatch):
    """Without oneDNN (what PyTorch does on CPUs without AVX-512 VNNI or AMX) ``torch._int_mm`` runs
    in plain loops, 18-25x slower than FP32 here: the measured choice is the dequantized weights."""
    with torch.backends.mkldnn.flags(enabled=False):
        assert not dispatch.probe_int_gemm()
        monkeypatch.setattr(dispatch, "_probed", {})
        set_switch(monkeypatch, "MASQUANT_INT_GEMM", "auto")
        assert not dispatch.int_gemm_fast(torch.device("cpu")) and dispatch._probed == {False: False}
    assert isinstance(dispatch.probe_int_gemm(), bool)  # (this CPU's answer: either is right)


def test_the_switch_forces_the_choice(monkeypatch):
    cpu = torch.device("cpu")
    set_switch(monkeypatch, "MASQUANT_INT_GEMM", "float")
    assert not dispatch.int_gemm_fast(cpu)
    set_switch(monkeypatch, "MASQUANT_INT_GEMM", "int")
    assert dispatch.int_gemm_fast(cpu)
    set_switch(monkeypatch, "MASQUANT_INT_GEMM", "fast")
    with pytest.raises(ValueError, match="MASQUANT_INT_GEMM must be auto, int or float"):
        dispatch.int_gemm_fast(cpu)


@pytest.mark.parametrize(("method", "w_bits", "group", "sym"), [("rtn", 8, 0, True), ("masquant", 4, 0, True),
                                                                ("smoothquant", 4, 32, False)])
def test_dequantized_weights_give_the_integer_paths_values(method, w_bits, group, sym, omni_model, fresh,
                                                           monkeypatch):
    """Where integer GEMMs are slow the model multiplies its weights dequantized once: the same
    activation codes, so the integer path's logits to float rounding, and no integer GEMM runs."""
    model = fresh(omni_model)
    config = QuantConfig(method=method, w_bits=w_bits, a_bits=8, w_group_size=group, w_symmetric=sym,
                         **options_for(method, rank=8, epochs=1))
    masquant.quantize(model, omni_samples(range(2)), config, progress=False)
    sample = omni_samples([500])[0]
    set_switch(monkeypatch, "MASQUANT_NATIVE", "0")  # (every product through the chosen GEMM)
    set_switch(monkeypatch, "MASQUANT_FUSE", "0")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    inputs = {}

    def keep(name):
        def hook(module, args):
            inputs.setdefault(name, (args[0], module.router.ids))
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad():
        integer = model(**sample).logits
        for hook in hooks:
            hook.remove()
        expected = {}
        for name, layer in layers.items():
            with layer.router.scope(inputs[name][1]):
                expected[name] = layer(inputs[name][0])
        set_switch(monkeypatch, "MASQUANT_INT_GEMM", "float")
        calls = []
        int_mm = torch._int_mm
        monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(1) or int_mm(*a))
        dequant = model(**sample).logits
        for name, layer in layers.items():  # each linear on the same input: float rounding only
            with layer.router.scope(inputs[name][1]):
                y = layer(inputs[name][0])
            assert float((y - expected[name]).norm() / expected[name].norm()) < 1e-5, name
    assert not calls and all("float32" in m.qweight._derived for m in layers.values())
    err = float((dequant - integer).norm() / integer.norm())  # (a code can round the other way downstream)
    assert err < 1e-3, f"dequantized weights differ from the integer GEMM by {err:.2e}"
