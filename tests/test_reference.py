import copy

import pytest
import torch

import masquant
from masquant import QuantConfig
from masquant.evaluation.evaluate import compare
from masquant.refmodels import registry
from masquant.refmodels.evaluate import EvalSizes, calibration_inputs, comparison_inputs, evaluate_reference
from masquant.refmodels.processor import to_rgb
from masquant.refmodels.tasks import qa_messages

SMALL = EvalSizes(item=40, digit=40, prose=10, word=40, match=40)
MODELS = ["ref-vl", "ref-omni"]
FLOORS = {"ref-vl": {"item": 0.7, "digit": 0.75},
          "ref-omni": {"item": 0.6, "digit": 0.65, "word": 0.8, "match": 0.7}}


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    model, processor = registry.load(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def fp_scores(reference):
    name, model, processor = reference
    return evaluate_reference(model, processor, name, SMALL)


def test_reference_model_is_a_real_qwen_architecture(reference):
    name, model, processor = reference
    expected = {"ref-vl": "qwen2_5_vl", "ref-omni": "qwen2_5_omni_thinker"}[name]
    assert masquant.get_adapter(model).name == expected
    assert (name == "ref-omni") == ("word" in registry.slices(name, "test"))
    assert sum(p.numel() * p.element_size() for p in model.parameters()) <= 25 * 2**20
    sample = calibration_inputs(processor, name)[0]
    ids = masquant.modality_ids(model, sample["input_ids"])
    assert int((ids == int(masquant.Modality.VISION)).sum()) == 16  # one 56x56 image = 16 merged patches


def test_full_precision_accuracy_floors(reference, fp_scores):
    for task, floor in FLOORS[reference[0]].items():
        assert fp_scores[task]["accuracy"] >= floor, (task, fp_scores)
    assert fp_scores["prose_ppl"] < 250, fp_scores


def test_calibration_and_test_slices_are_disjoint(reference):
    name = reference[0]
    calib, test = registry.slices(name, "calib"), registry.slices(name, "test")
    for task in ("item", "digit"):
        assert not {bytes(x) for x in calib[task][0]} & {bytes(x) for x in test[task][0]}
    assert not set(calib["prose"]) & set(test["prose"])


def test_w8a8_masquant_stays_near_full_precision(reference, fp_scores):
    name, model, processor = reference
    qmodel = copy.deepcopy(model)
    masquant.quantize(qmodel, calibration_inputs(processor, name)[::3],
                      QuantConfig(method="masquant", w_bits=8, a_bits=8, rank=32, epochs=1), progress=False)
    q = evaluate_reference(qmodel, processor, name, SMALL)
    for task in FLOORS[name]:
        assert q[task]["accuracy"] >= fp_scores[task]["accuracy"] - 0.05, (task, fp_scores, q)
    assert q["prose_ppl"] <= fp_scores["prose_ppl"] * 1.05
    sqnr = compare(model, qmodel, comparison_inputs(processor, name, n=4))["decoder_sqnr"]
    assert min(sqnr.values()) > 15, sqnr


def test_generate_names_the_item(reference):
    name, model, processor = reference
    images, labels = registry.slices(name, "test")["item"]
    text = processor.apply_chat_template(qa_messages("item", 0), add_generation_prompt=True)
    hits = 0
    for image, label in zip(images[:10], labels[:10], strict=True):
        batch = processor([text], images=[to_rgb(image)])
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        answer = processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        hits += answer == masquant.refmodels.data.FASHION_CLASSES[label]
    assert hits >= 5, hits
