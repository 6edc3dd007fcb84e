"""``masquant export --format vllm``: what the checkpoint holds (vLLM itself: tests/test_vllm_serving.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import masquant
from masquant import QuantConfig, QuantLinear
from masquant.io.export_vllm import export_vllm

from conftest import omni_samples, vl_samples


def _export(model, samples, tmp_path, **kwargs):
    masquant.quantize(model, samples, QuantConfig(**kwargs), progress=False)
    masquant.save(model, tmp_path / "q")
    return export_vllm(tmp_path / "q", tmp_path / "v")


@pytest.mark.parametrize(("kwargs", "names"), [
    (dict(method="masquant", rank=4, epochs=1), {"vision"}),
    (dict(method="masquant", rank=4, epochs=1, text_patch=True), {"text", "vision"}),
    (dict(method="lrc", rank=4), {"all"})])
def test_every_linear_is_exported_as_stored(kwargs, names, vl_model, fresh, tmp_path):
    """Patches by modality, MASQuant's text patch and lrc's shared one go out as the layer holds them."""
    model = fresh(vl_model)
    spec = _export(model, vl_samples(range(3)), tmp_path, w_bits=4, **kwargs)
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["architectures"] == ["MasquantQwen2_5_VLForConditionalGeneration"]
    assert config["quantization_config"] == spec and spec["quant_method"] == "masquant"
    tensors = load_file(tmp_path / "v" / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(spec["linears"]) == len(layers)
    for name, layer in layers.items():
        key = name.removeprefix("model.language_model.layers.")
        assert spec["linears"][key]["patches"] == {m: p.l1.shape[1] for m, p in layer.patches.items()}
        assert tensors[f"{name}.weight"].dtype == torch.uint8  # W4: two codes per byte, as stored
        assert torch.equal(tensors[f"{name}.weight"], layer.qweight.codes)
        assert torch.equal(tensors[f"{name}.weight_scale"], layer.qweight.scale.reshape(layer.out_features, 1))
        assert torch.equal(tensors[f"{name}.smooth"], layer.smooth)
        for m, patch in layer.patches.items():
            assert torch.equal(tensors[f"{name}.patch_l1_{m}"], patch.l1)
    assert {m for k in spec["linears"] for m in spec["linears"][k]["patches"]} == names
    assert not any(k.endswith(".qweight.codes") for k in tensors)
    assert "model.language_model.embed_tokens.weight" in tensors


def test_an_omni_thinker_is_laid_out_as_vllm_reads_qwen2_5_omni(omni_model, fresh, tmp_path):
    model = fresh(omni_model)
    spec = _export(model, omni_samples(range(3)), tmp_path, method="masquant", w_bits=8, rank=4, epochs=1)
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["architectures"] == [
        "MasquantQwen2_5OmniThinkerForConditionalGeneration"]
    thinker = config["thinker_config"]
    assert thinker["model_type"] == "qwen2_5_omni_thinker" and "quantization_config" not in thinker
    assert thinker["text_config"]["tie_word_embeddings"] == model.config.tie_word_embeddings
    tensors = load_file(tmp_path / "v" / "model.safetensors")
    assert all(k.startswith("thinker.") for k in tensors)
    assert any(k.startswith("thinker.model.layers.0.self_attn.q_proj.") for k in tensors)
    assert any(k.startswith("thinker.audio_tower.") for k in tensors) and any(k.startswith("thinker.visual.")
                                                                               for k in tensors)
    assert set(spec["router"].values()) == {"vision", "audio"}


def test_a_full_precision_checkpoint_is_exported_unquantized(tmp_path):
    from masquant.refmodels import registry

    assert export_vllm(registry.model_dir("ref-omni"), tmp_path / "fp") is None
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5OmniForConditionalGeneration"] and "quantization_config" not in config
    pre = json.loads((tmp_path / "fp" / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "WhisperFeatureExtractor" and pre["feature_size"] == 80
    tokens = json.loads((tmp_path / "fp" / "tokenizer_config.json").read_text())["extra_special_tokens"]
    assert tokens["audio_token"] == "<|AUDIO|>" and tokens["image_token"] == "<|image_pad|>"


def test_a_reference_checkpoint_gets_the_video_processor_of_its_image_processor(tmp_path):
    """vLLM builds Qwen2-VL's video processor from video_preprocessor_config.json: the reference
    model's image patching, frames as given (served videos: tests/test_vllm_serving.py)."""
    from masquant.refmodels import registry

    export_vllm(registry.model_dir("ref-vl"), tmp_path / "fp")
    image = json.loads((tmp_path / "fp" / "preprocessor_config.json").read_text())
    video = json.loads((tmp_path / "fp" / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and video["do_sample_frames"] is False
    assert all(video[k] == image[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "size",
                                                  "image_mean", "image_std"))
    export_vllm(registry.model_dir("ref-omni"), tmp_path / "fp-omni")
    omni = json.loads((tmp_path / "fp-omni" / "video_preprocessor_config.json").read_text())
    assert omni["patch_size"] == image["patch_size"] and omni["size"] == image["size"]


def test_refusals(vl_model, fresh, tmp_path):
    with pytest.raises(ValueError, match="MAS-only"):
        _export(fresh(vl_model), vl_samples(range(2)), tmp_path / "a", method="mas", w_bits=4, epochs=0)
    with pytest.raises(ValueError, match="per-tensor"):
        _export(fresh(vl_model), vl_samples(range(2)), tmp_path / "b", method="rtn", w_group_size=-1)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="supports Qwen2_5_VLForConditionalGeneration"):
        export_vllm(tmp_path / "c", tmp_path / "d")
