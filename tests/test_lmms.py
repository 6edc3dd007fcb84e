"""The lmms-eval model wrapper (masquant.evaluation.lmms) on the reference VL model, offline: direct requests,
a saved quantized model, and lmms-eval's evaluator on a small local task."""

import importlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lmms_eval")

import lmms_eval.models
from lmms_eval.api.instance import Instance
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

import masquant
from masquant import QuantConfig
from masquant.evaluation.lmms import MasquantLMM
from masquant.refmodels import registry
from masquant.refmodels.data import DIGIT_WORDS, FASHION_CLASSES
from masquant.refmodels.evaluate import calibration_inputs
from masquant.refmodels.processor import to_rgb

QUESTION = "Which digit is this?"
TASK = "digits"


@pytest.fixture(scope="module")
def digits():
    images, labels = registry.slices("ref-vl", "test")["digit"]
    return [{"image": to_rgb(images[i]), "question": QUESTION, "answer": DIGIT_WORDS[labels[i]],
             "label": int(labels[i])} for i in range(6)]


@pytest.fixture(scope="module")
def lm(digits):
    model = MasquantLMM(pretrained="ref-vl", device="cpu")
    model.task_dict = {TASK: {"test": digits}}  # what lmms-eval's evaluator sets before sending requests
    return model


def _visual(doc):
    return [doc["image"]]


def _generate(doc_id: int, **gen_kwargs) -> Instance:
    return Instance("generate_until", (QUESTION, gen_kwargs, _visual, doc_id, TASK, "test"), 0,
                    {"task": TASK, "doc_id": doc_id, "repeats": 1})


def _score(doc_id: int, continuation) -> Instance:
    return Instance("loglikelihood", (QUESTION, continuation, _visual, doc_id, TASK, "test"), 0,
                    {"task": TASK, "doc_id": doc_id, "repeats": 1})


def test_registered_with_lmms_eval():
    assert lmms_eval.models.get_model("masquant") is MasquantLMM
    from lmms_eval.api.registry import get_model

    assert get_model("masquant") is MasquantLMM


def test_import_masquant_does_not_need_lmms_eval():
    code = "import sys, masquant, masquant.cli.main; assert not any(m.startswith('lmms_eval') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clear_error_without_lmms_eval(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "lmms_eval"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "masquant.evaluation.lmms")
    with pytest.raises(ImportError, match=r"pip install --no-deps 'lmms-eval"):
        importlib.import_module("masquant.evaluation.lmms")


def test_generate_until_answers_from_the_image(lm, digits):
    answers = lm.generate_until([_generate(i, until=["\n\n"], max_new_tokens=8) for i in range(4)])
    assert all(isinstance(a, str) for a in answers)
    assert sum(a.strip() == d["answer"] for a, d in zip(answers, digits, strict=False)) >= 3, answers


def test_generate_until_honours_until_and_max_new_tokens(lm, digits, monkeypatch):
    full = lm.generate_until([_generate(1, max_new_tokens=8)])[0]
    assert full == digits[1]["answer"] == "seven"
    assert lm.generate_until([_generate(1, until=["v"], max_new_tokens=8)]) == ["se"]
    calls = []
    generate = lm.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(lm.model, "generate", spy)
    (one,) = lm.generate_until([_generate(1, max_new_tokens=1, temperature=0.7, do_sample=True)])
    assert calls[0]["max_new_tokens"] == 1 and calls[0]["do_sample"] is False
    assert len(lm.tokenizer(one, add_special_tokens=False)["input_ids"]) == 1 and full.startswith(one)
    lm.generate_until([_generate(1)])
    assert calls[1]["max_new_tokens"] == lm.max_new_tokens  # the default when a task sets none


def test_loglikelihood_ranks_the_right_digit(lm, digits):
    for doc_id in (0, 1):
        scores = lm.loglikelihood([_score(doc_id, " " + word) for word in DIGIT_WORDS])
        lls = [ll for ll, _ in scores]
        assert all(isinstance(ll, float) and ll <= 0 for ll in lls)
        best = max(range(10), key=lls.__getitem__)
        assert DIGIT_WORDS[best] == digits[doc_id]["answer"]
        assert scores[best][1] is True  # the right answer is the greedy one
        assert not any(greedy for i, (_, greedy) in enumerate(scores) if i != best)
    # the continuation may be a doc -> target function, as lmms-eval passes it for loglikelihood tasks
    by_fn = lm.loglikelihood([_score(0, lambda doc: doc["answer"])])[0]
    by_text = lm.loglikelihood([_score(0, digits[0]["answer"])])[0]
    assert by_fn == pytest.approx(by_text)
    # the unconditional requests of acc_mutual_info carry neither images nor a document
    ((ll, greedy),) = lm.loglikelihood([Instance("loglikelihood", ("", "seven"), 0,
                                                 {"task": TASK, "doc_id": 0, "repeats": 1})])
    assert ll < 0 and isinstance(greedy, bool)


def test_image_placeholders_are_interleaved(lm):
    messages, order = lm._messages("Compare <image 2> with <image 1>.", ["a", "b"], 0)
    assert order == ["b", "a"]
    content = messages[-1]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    messages, order = lm._messages("<image>\nWhat is shown?", ["a"], 0)
    assert order == ["a"] and [c["type"] for c in messages[-1]["content"]] == ["image", "text"]
    assert messages[-1]["content"][1]["text"] == "What is shown?"


def test_saved_quantized_model(tmp_path, digits):
    model, processor = registry.load("ref-vl")
    calib = calibration_inputs(processor, "ref-vl")[::8]
    masquant.quantize(model, calib, QuantConfig(method="rtn", w_bits=8, a_bits=8), progress=False)
    masquant.save(model, tmp_path / "q", processor=processor, reference="ref-vl")
    qlm = MasquantLMM(pretrained=str(tmp_path / "q"), device="cpu")
    assert any(isinstance(m, masquant.QuantLinear) for m in qlm.model.modules())
    qlm.task_dict = {TASK: {"test": digits}}
    answers = qlm.generate_until([_generate(i, max_new_tokens=8) for i in range(4)])
    assert sum(a.strip() == d["answer"] for a, d in zip(answers, digits, strict=False)) >= 3, answers


def test_simple_evaluate_on_a_local_task(tmp_path, monkeypatch, digits):
    """A task as a user writes one: a YAML file, a doc_to_visual function beside it, and a local
    parquet file, run by lmms-eval's evaluator on the model named "masquant"."""
    import datasets

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "label": datasets.Value("int64")})
    datasets.Dataset.from_list(digits, features=features).to_parquet(str(tmp_path / "digits.parquet"))
    (tmp_path / "digits_utils.py").write_text("def doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n")
    (tmp_path / "digits.yaml").write_text(textwrap.dedent(f"""\
        task: masquant_digits
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {tmp_path / "digits.parquet"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function digits_utils.doc_to_visual
        doc_to_text: "{{{{question}}}}"
        doc_to_target: answer
        generation_kwargs:
          until: ["\\n"]
          max_new_tokens: 8
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: true
        """))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = simple_evaluate(model="masquant", model_args="pretrained=ref-vl,device=cpu", tasks=["masquant_digits"],
                          task_manager=tasks, batch_size=1, log_samples=False, bootstrap_iters=0)
    metrics = out["results"]["masquant_digits"]
    assert 0.5 <= metrics["exact_match,none"] <= 1.0, metrics


def test_omni_audio_and_images():
    from masquant.refmodels.speech import WORDS
    from masquant.refmodels.tasks import TEMPLATES

    lm = MasquantLMM(pretrained="ref-omni", device="cpu")
    data = registry.slices("ref-omni", "test")
    (clips, words), (images, items) = data["word"], data["item"]
    lm.task_dict = {TASK: {"test": [{"audio": {"array": clips[i], "sampling_rate": 16_000},
                                     "image": to_rgb(images[i])} for i in range(3)]}}

    def ask(modality, question, i):
        args = (question, {"max_new_tokens": 6}, lambda doc: [doc[modality]], i, TASK, "test")
        return Instance("generate_until", args, 0, {"task": TASK, "doc_id": i, "repeats": 1})

    heard = lm.generate_until([ask("audio", TEMPLATES["word"][0], i) for i in range(3)])
    seen = lm.generate_until([ask("image", TEMPLATES["item"][0], i) for i in range(3)])
    assert sum(h == WORDS[w] for h, w in zip(heard, words, strict=False)) >= 2, (heard, words[:3])
    assert sum(s == FASHION_CLASSES[c] for s, c in zip(seen, items, strict=False)) >= 2, (seen, items[:3])


def test_only_per_token_inputs_grow_with_the_continuation():
    import torch

    from masquant.evaluation.lmms import _extend

    batch = {"input_ids": torch.ones(1, 5, dtype=torch.long), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "feature_attention_mask": torch.ones(1, 5, dtype=torch.long)}  # audio frames, by chance as many
    out = _extend(batch, torch.tensor([[7, 8]]))
    assert out["input_ids"].shape == out["attention_mask"].shape == (1, 7)
    assert out["feature_attention_mask"].shape == (1, 5)
