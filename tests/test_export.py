"""Export to compressed-tensors: loads back through transformers' compressed-tensors support."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import masquant
from masquant import QuantConfig
from masquant.export import export_compressed_tensors

from conftest import vl_samples


def _export(vl_model, fresh, tmp_path, **kwargs):
    model = fresh(vl_model)
    masquant.quantize(model, vl_samples(range(3)), QuantConfig(**kwargs), progress=False)
    masquant.save(model, tmp_path / "q")
    return model, export_compressed_tensors(tmp_path / "q", tmp_path / "ct")


@pytest.mark.parametrize(("kwargs", "fmt", "tolerance"), [
    (dict(method="rtn", w_bits=8), "int-quantized", 0.02),
    (dict(method="masquant", w_bits=4, rank=4, epochs=1), "pack-quantized", 0.15),
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
