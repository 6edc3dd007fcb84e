"""Export to compressed-tensors: loads back through transformers' compressed-tensors support."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import masquant
from masquant import QuantConfig
from masquant.io.export import export_compressed_tensors

from conftest import first_q_proj_outputs, vl_samples


def _export(vl_model, fresh, tmp_path, **kwargs):
    model = fresh(vl_model)
    masquant.quantize(model, vl_samples(range(3)), QuantConfig(**kwargs), progress=False)
    masquant.save(model, tmp_path / "q")
    return model, export_compressed_tensors(tmp_path / "q", tmp_path / "ct")


@pytest.mark.parametrize(("kwargs", "fmt", "tolerance"), [
    (dict(method="rtn", w_bits=8), "int-quantized", 0.02),
    (dict(method="masquant", w_bits=4, rank=4, epochs=1), "int-quantized", 0.15),
    (dict(method="awq", w_bits=4, a_bits=16, w_group_size=32, awq_grid=4), "pack-quantized", 0.15),
])
def test_export_loads_back_and_keeps_the_text_path(vl_model, fresh, tmp_path, kwargs, fmt, tolerance):
    model, summary = _export(vl_model, fresh, tmp_path, **kwargs)
    assert summary["format"] == fmt
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ct")
    sample = vl_samples([99], image=False, text_len=20)[0]
    with torch.no_grad():
        a, b = model(**sample).logits, back(**sample).logits
    assert float((a - b).norm() / a.norm()) < tolerance
    if kwargs["method"] == "masquant":
        from safetensors.torch import load_file

        side = load_file(tmp_path / "ct" / "masquant_sidecar.safetensors")
        assert any(k.endswith(".patches.vision.l1") for k in side) and any(k.endswith(".smooth") for k in side)
        assert summary["requantized"]  # o_proj cannot fold its text vector into a norm


def test_export_refusals(vl_model, fresh, tmp_path):
    with pytest.raises(ValueError, match="MAS-only"):
        _export(vl_model, fresh, tmp_path, method="mas", w_bits=4, epochs=0)
    with pytest.raises(ValueError, match="symmetric"):
        _export(vl_model, fresh, tmp_path / "b", method="rtn", w_bits=4, a_bits=16, w_symmetric=False)


def test_the_sidecar_restores_the_non_text_tokens(vl_model, fresh, tmp_path):
    """Without the sidecar every token takes the text path; with it, vision tokens get their own
    vector and patch again: at a norm-folded linear (layer 0 q_proj, same input in all three
    models) the routed export matches the masquant model on vision rows, the plain one does not;
    text rows are the same either way."""
    from masquant.io.sidecar import SidecarLinear, load_export

    model, _ = _export(vl_model, fresh, tmp_path, method="masquant", w_bits=4, rank=8, epochs=1)
    plain, _, _ = load_export(tmp_path / "ct", sidecar=False)
    routed, _, _ = load_export(tmp_path / "ct", sidecar=True)
    assert not any(isinstance(m, SidecarLinear) for m in plain.modules())
    assert any(isinstance(m, SidecarLinear) for m in routed.modules())
    sample = vl_samples([99])[0]
    vision = masquant.modality_ids(model, sample["input_ids"])[0] == int(masquant.Modality.VISION)
    ref, a, b = first_q_proj_outputs((model, plain, routed), sample)
    err = {name: float((x - ref)[vision].norm() / ref[vision].norm()) for name, x in (("plain", a), ("routed", b))}
    assert err["routed"] < 0.25 * err["plain"], err
    assert torch.allclose(a[~vision], b[~vision], atol=1e-5)


def test_load_export_refuses_a_directory_without_sidecar(tmp_path):
    from masquant.io.sidecar import read_sidecar

    with pytest.raises(FileNotFoundError, match="masquant_sidecar"):
        read_sidecar(tmp_path)


def test_export_bench_rows_and_table(monkeypatch):
    """The export benchmark's plumbing on a tiny model (the real run is `masquant bench --export`)."""
    from masquant.bench import export as exportbench

    rows = [{"model": "ref-vl", "bits": "W4A8", "variant": v, "scores": {"item": {"accuracy": 0.5}, "prose_ppl": 3.0},
             "decoder_sqnr": {"vision": 20.0}} for v in ("masquant model", "export + sidecar")]
    table = exportbench.markdown(rows)
    assert "| ref-vl | W4A8 | export + sidecar | 50.0 | 3.000 | 20.00 |" in table


def test_sidecar_tensors_follow_the_module_to_another_device():
    from masquant.io.sidecar import SidecarLinear
    from masquant.modality import ModalityRouter

    layer = SidecarLinear(torch.nn.Linear(8, 4), torch.rand(3, 8) + 0.5,
                          {1: (torch.randn(8, 2), torch.randn(2, 4))}, ModalityRouter({})).to("meta")
    assert {t.device.type for t in layer.buffers()} == {"meta"}
    assert {"l1_1", "l2_1", "relative"} <= set(dict(layer.named_buffers()))
