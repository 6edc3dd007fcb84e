"""Modality ids follow what a forward carries: placeholders are media when their features come
with the forward (also after earlier turns in the KV cache), text otherwise (generated tokens)."""

import pytest
import torch

import masquant
from masquant import Modality, QuantLinear
from masquant.modality import ModalityRouter, get_router
from masquant.refmodels import registry
from masquant.refmodels.evaluate import CLASSES, calibration_inputs, slices
from masquant.refmodels.processor import to_rgb
from masquant.refmodels.tasks import qa_messages

IMAGE, AUDIO = 7, 8


def test_placeholders_are_media_only_when_the_forward_carries_their_features():
    router = ModalityRouter({IMAGE: Modality.VISION, AUDIO: Modality.AUDIO},
                            {Modality.VISION: ("pixel_values",), Modality.AUDIO: ("input_features",)})
    ids = torch.tensor([[1, IMAGE, IMAGE, AUDIO, 2]])
    assert router.forward_ids(ids, {"pixel_values": torch.zeros(1)}).tolist() == [[0, 1, 1, 0, 0]]
    assert router.forward_ids(ids, {"input_features": torch.zeros(1)}).tolist() == [[0, 0, 0, 2, 0]]
    assert router.forward_ids(ids, {"pixel_values": None}).tolist() == [[0, 0, 0, 0, 0]]  # a decode step
    # without carriers (a generic adapter that names none) the token alone decides, cache or not
    assert ModalityRouter({IMAGE: Modality.VISION}).forward_ids(ids, {}).tolist() == [[0, 1, 1, 0, 0]]


@pytest.fixture(scope="module")
def ref_vl_masquant():
    model, processor = registry.load("ref-vl")
    calib = calibration_inputs(processor, "ref-vl")[::8]
    masquant.quantize(model, calib, masquant.QuantConfig(method="masquant", w_bits=4, a_bits=8, epochs=1),
                      progress=False)
    return model, processor


def _two_turns(processor):
    """A chat whose second user turn brings an image: the inputs, and where the second turn starts."""
    images, _ = slices("ref-vl", "test")["item"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name a thing to wear."}]},
                {"role": "assistant", "content": CLASSES["item"][3]}, *qa_messages("item", 0)]
    batch = processor([processor.apply_chat_template(messages, add_generation_prompt=True)],
                      images=[to_rgb(images[0])])
    first_image = int((batch["input_ids"][0] == processor.image_pad).nonzero()[0])
    return batch, first_image - 3


def test_an_image_in_a_later_turn_is_routed_as_vision_with_a_reused_cache(ref_vl_masquant):
    """MASQuant W4A8 on ref-vl: prefilling the second turn on the first turn's cache gives the
    logits of one uncached forward of the whole chat, and its image tokens take the vision path."""
    model, processor = ref_vl_masquant
    batch, split = _two_turns(processor)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rope, _ = model.model.get_rope_index(ids, image_grid_thw=batch["image_grid_thw"], attention_mask=mask,
                                        mm_token_type_ids=batch["mm_token_type_ids"])
    positions = torch.cat([(mask.long().cumsum(-1) - 1)[None], rope])  # the same positions both ways
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    routed = []
    hook = layer.register_forward_pre_hook(lambda module, args: routed.append(get_router(model).ids.clone()))
    try:
        with torch.no_grad():
            whole = model(**batch, position_ids=positions).logits
            first = model(input_ids=ids[:, :split], attention_mask=mask[:, :split],
                          position_ids=positions[..., :split], use_cache=True)
            second = model(input_ids=ids[:, split:], attention_mask=mask, position_ids=positions[..., split:],
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                           mm_token_type_ids=batch["mm_token_type_ids"][:, split:], cache=first.cache,
                           use_cache=True).logits
    finally:
        hook.remove()
        model.model.rope_deltas = None
    image = ids[:, split:] == processor.image_pad
    assert bool(image.any()) and torch.equal(routed[-1] == int(Modality.VISION), image)
    err = float((whole[:, split:] - second).norm() / whole[:, split:].norm())
    assert err < 1e-4, f"the cached second turn differs from the uncached chat by {err:.2e}"


def test_generated_tokens_are_text(ref_vl_masquant):
    model, processor = ref_vl_masquant
    batch, _ = _two_turns(processor)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    routed = []
    hook = layer.register_forward_pre_hook(lambda module, args: routed.append(get_router(model).ids.clone()))
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert bool((routed[0] == int(Modality.VISION)).any())  # the prefill
    assert len(routed) >= 2 and all(bool((ids == int(Modality.TEXT)).all()) for ids in routed[1:])
