import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import masquant
from masquant import Modality
from masquant.modality import ModalityRouter
from masquant.refmodels import tiny


def test_modality_enum():
    assert [int(m) for m in Modality] == [0, 1, 2]
    assert [m.name for m in Modality] == ["TEXT", "VISION", "AUDIO"]


def test_qwen2_5_vl_modalities(vl_model):
    ids = torch.tensor([[1, tiny.IMAGE_TOKEN, 5, tiny.VIDEO_TOKEN, tiny.AUDIO_TOKEN, tiny.VISION_START]])
    out = masquant.modality_ids(vl_model, ids)
    # VL has no audio: the audio id is an ordinary text token there; vision_start is text
    assert out.tolist() == [[0, 1, 0, 1, 0, 0]]
    assert out.dtype == torch.long and out.shape == ids.shape


def test_qwen2_5_omni_thinker_modalities(omni_model):
    sample = tiny.tiny_sample(3, family="omni", image=True, audio=True)
    out = masquant.modality_ids(omni_model, sample["input_ids"])
    assert torch.equal(out, tiny.expected_modalities(sample["input_ids"]))
    assert {0, 1, 2} == set(out.unique().tolist())


def test_adapters_resolve_by_model_type(vl_model, omni_model):
    assert masquant.get_adapter(vl_model).name == "qwen2_5_vl"
    assert masquant.get_adapter(omni_model).name.startswith("qwen2_5_omni_thinker")  # _flat before ~5.2x


@pytest.mark.reliability(
    case='unsupported architecture (a Qwen2 text model)',
    expect='UnsupportedArchitectureError listing the supported families and `generic_adapter`; the '
           'model is not touched')
def test_unknown_architecture_names_the_supported_ones():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(masquant.UnsupportedArchitectureError) as err:
        masquant.get_adapter(model)
    msg = str(err.value)
    assert "Qwen2ForCausalLM" in msg and "qwen2_5_vl" in msg and "qwen2_5_omni_thinker" in msg
    assert "generic_adapter" in msg
    with pytest.raises(masquant.UnsupportedArchitectureError):
        masquant.quantize(model, [{"input_ids": torch.tensor([[1, 2, 3]])}])


def test_generic_adapter_on_a_text_decoder():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    adapter = masquant.generic_adapter("model.layers", "model.norm", {Modality.VISION: [60, 61]})
    ids = torch.tensor([[1, 60, 61, 2]])
    assert masquant.modality_ids(model, ids, adapter).tolist() == [[0, 1, 1, 0]]
    calib = [{"input_ids": torch.randint(0, 64, (1, 10))} for _ in range(2)]
    report = masquant.quantize(model, calib, masquant.QuantConfig(method="smoothquant"), adapter=adapter,
                               progress=False)
    assert report.adapter == "generic" and len(report.layers) == 2
    assert isinstance(model.model.layers[0].self_attn.q_proj, masquant.QuantLinear)


@pytest.mark.reliability(
    case='generic adapter with module paths the model lacks',
    expect='ValueError naming the missing module')
def test_generic_adapter_with_wrong_paths_explains():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    adapter = masquant.generic_adapter("model.blocks", "model.norm")
    with pytest.raises(ValueError, match=r"no module 'model.blocks'"):
        masquant.quantize(model, [{"input_ids": torch.tensor([[1, 2]])}], adapter=adapter)


def test_router_routes_by_the_features_a_forward_carries_not_by_the_cache():
    router = ModalityRouter({7: Modality.VISION}, {Modality.VISION: ("pixel_values",)})

    class Cache:
        def __init__(self, n):
            self.n = n

        def get_seq_length(self):
            return self.n

    pixels = torch.zeros(4, 3)
    router.hook(None, (), {"input_ids": torch.tensor([[7, 1]]), "cache": Cache(0), "pixel_values": pixels})
    assert router.ids.tolist() == [[1, 0]]  # prefill: placeholders keep their modality
    router.hook(None, (), {"input_ids": torch.tensor([[7, 7, 1]]), "cache": Cache(5), "pixel_values": pixels})
    assert router.ids.tolist() == [[1, 1, 0]]  # a later turn's image, on a reused cache: still vision
    router.hook(None, (), {"input_ids": torch.tensor([[7]]), "cache": Cache(5)})
    assert router.ids.tolist() == [[0]]  # decode step, no features: text, whatever the id
    router.hook(None, (), {"inputs_embeds": torch.zeros(1, 2, 4)})
    assert router.ids is None
    with router.scope(torch.tensor([[1, 1]])):
        router.hook(None, (), {"input_ids": torch.tensor([[0, 0]])})
        assert router.ids.tolist() == [[1, 1]]  # explicit scope wins over the hook
        router.clear()
        assert router.ids is not None
    with pytest.raises(RuntimeError, match="modality ids are not set"):
        router.rows(torch.zeros(1, 2, 4))


def test_the_omni_thinker_layout_of_older_transformers_is_recognised(omni_model):
    """transformers before ~5.2x kept the thinker's decoder at model.layers, the encoders beside model."""
    flat = torch.nn.Module()
    flat.config = omni_model.config
    flat.model = torch.nn.Module()
    flat.model.layers = omni_model.model.language_model.layers
    flat.model.norm = omni_model.model.language_model.norm
    adapter = masquant.get_adapter(flat)
    assert adapter.name == "qwen2_5_omni_thinker_flat"
    adapter.validate(flat)
    assert len(adapter.decoder_layers(flat)) == len(omni_model.model.language_model.layers)
    # a thinker with neither layout: the error names the path that is missing
    broken = torch.nn.Module()
    broken.config = omni_model.config
    with pytest.raises(ValueError, match=r"model\.language_model\.layers"):
        masquant.get_adapter(broken).validate(broken)


def test_generic_adapter_calibrates_on_image_samples():
    """A generic adapter does not list its feature inputs: image features must not be refused."""
    adapter = masquant.generic_adapter("model.language_model.layers", "model.language_model.norm",
                                       {masquant.Modality.VISION: [tiny.IMAGE_TOKEN]})
    model = tiny.tiny_qwen2_5_vl(layers=1)
    report = masquant.quantize(model, [tiny.tiny_sample(i, "vl") for i in range(2)],
                               masquant.QuantConfig(method="smoothquant"), adapter=adapter, progress=False)
    assert set(report.tokens) == {"text", "vision"}


def test_router_routes_are_computed_once_per_ids_and_follow_changes():
    """The rows of each modality are shared by every linear of a forward, and recomputed when
    the ids change (new ids, or the same tensor modified in place)."""

    router = ModalityRouter({})
    x = torch.zeros(1, 6, 4)
    ids = torch.tensor([[0, 1, 1, 0, 2, 0]])
    with router.scope(ids):
        routes = router.routes(x)
        assert routes.ids.tolist() == [0, 1, 1, 0, 2, 0]
        assert routes.rows[1] == slice(1, 3) and routes.rows[2] == slice(4, 5) and routes.rows[0].tolist() == [0, 3, 5]
        assert router.routes(x) is routes  # the same forward: not recomputed
        idx, back = routes.order()
        assert torch.equal(torch.cat(idx)[back], torch.arange(6))  # gathered by modality, then back in row order
        ids[0, 3] = 1  # modified in place
        assert router.routes(x).rows[1] == slice(1, 4)
    with router.scope(torch.zeros(1, 6, dtype=torch.long)):
        assert set(router.routes(x).rows) == {0} and router.routes(x).text_only
        with pytest.raises(RuntimeError, match="do not match"):
            router.routes(torch.zeros(1, 5, 4))
