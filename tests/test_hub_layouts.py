"""The command line on checkpoints laid out as the Hub's Qwen2.5-VL-3B/7B-Instruct and Qwen2.5-Omni
downloads (tests/hub_layouts.py): quantize, save, load, generate with the model's own processor,
evaluate (lmms-eval's ``masquant`` model) and export (compressed-tensors, vLLM). Marked ``vllm``: .ci/run
runs this file in both lanes, the main venv's (no torchvision: the processor is ``PilProcessor``) and the
vLLM venv's (transformers' own processor; there the vLLM exports are also served)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hub_layouts as hub
import masquant
from masquant.cli.main import main
from masquant.io.hf import load_hf, processor_of
from masquant.io.pil_processor import PilProcessor

pytestmark = pytest.mark.vllm
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
CLIP = (0.3 * np.sin(np.arange(16000) / 7.0)).astype(np.float32)  # one second at 16 kHz


def _image(seed: int, height: int = 84, width: int = 112) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def cli(*args: str) -> None:
    assert main([*args]) == 0, args


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> dict:
    """Calibration files: images with questions and a text line; for Omni, spoken clips too."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("calib")
    lines = []
    for i in range(3):
        _image(i, 56 + 28 * i).save(root / f"item{i}.png")
        lines.append({"text": "What is this item?", "image": f"item{i}.png"})
    lines.append({"text": "It was the best of times, it was the worst of times."})
    (root / "vl.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    sf.write(root / "clip.wav", CLIP, 16000)
    lines += [{"text": "What do you hear?", "audio": "clip.wav"},
              {"text": "Describe both.", "image": "item0.png", "audio": "clip.wav"}]
    (root / "omni.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return {"vl": root / "vl.jsonl", "omni": root / "omni.jsonl"}


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict:
    """name -> (directory, its tensors by Hub name)."""
    root = tmp_path_factory.mktemp("hub")
    return {"vl-3b": (root / "vl-3b", hub.write_qwen2_5_vl(root / "vl-3b", "3b")),
            "vl-7b": (root / "vl-7b", hub.write_qwen2_5_vl(root / "vl-7b", "7b", seed=1)),
            "omni": (root / "omni", hub.write_qwen2_5_omni(root / "omni"))}


# (download, quantize flags): W4A8 MASQuant on the tied 3B layout and the kept full Omni (patches large
# enough that routing shows in vLLM), W8A8 SmoothQuant on the untied 7B one and the thinker alone
RUNS = {"vl-3b": ("vl-3b", "--method", "masquant", "--w-bits", "4", "--rank", "4", "--epochs", "1"),
        "vl-7b": ("vl-7b", "--method", "smoothquant", "--w-bits", "8"),
        "omni-keep": ("omni", "--method", "masquant", "--w-bits", "4", "--rank", "4", "--epochs", "1"),
        "omni-drop": ("omni", "--method", "smoothquant", "--w-bits", "8", "--talker", "drop")}


@pytest.fixture(scope="module")
def quantized(downloads, calib, tmp_path_factory) -> dict:
    """run -> (download directory, saved directory, compressed-tensors export, vLLM export)."""
    root, out = tmp_path_factory.mktemp("quantized"), {}
    for run, (name, *flags) in RUNS.items():
        source = downloads[name][0]
        saved = root / run
        cli("quantize", "--model", str(source), "--calib", str(calib[name.split("-")[0]]), *flags,
            "--a-bits", "8", "--out", str(saved), "--no-progress")
        cli("export", str(saved), "--format", "compressed-tensors", "--out", str(root / f"{run}-ct"))
        cli("export", str(saved), "--format", "vllm", "--out", str(root / f"{run}-vllm"))
        out[run] = (source, saved, root / f"{run}-ct", root / f"{run}-vllm")
    return out


def _prompt(processor, omni: bool, image: bool = True, audio: bool = False) -> dict:
    """The model's own processor on a chat prompt (an image, a clip), as a user runs it."""
    content = [*([{"type": "audio"}] if audio else []), *([{"type": "image"}] if image else []),
               {"type": "text", "text": "What is this item?"}]  # (clips first, as lmms-eval's model puts them)
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    media = {**({"images": [_image(7)]} if image else {}), **({"audio": [CLIP]} if audio else {})}
    return dict(processor(text=[text], return_tensors="pt", **media))


def _logits(model, batch: dict) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items() if torch.is_tensor(v)}
    with torch.no_grad():
        return model(**batch, use_cache=False).logits[0].float()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of two logit rows per position."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@pytest.mark.parametrize("name,talker", [("vl-3b", False), ("vl-7b", False), ("omni", False), ("omni", True)])
def test_a_download_loads_with_every_weight_and_its_processor(downloads, name, talker):
    path, tensors = downloads[name]
    model, processor = load_hf(path, talker=talker)
    if talker:  # the whole model: the thinker's names under thinker.
        mine = hub.hub_names(model.state_dict(), prefix="thinker.")
    else:  # Qwen2.5-VL, or an Omni thinker alone
        mine = {f"{'thinker.' if name == 'omni' else ''}{k}": v for k, v in hub.hub_names(model.state_dict()).items()}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("talker.", "token2wav."))}
    assert set(tensors) <= set(mine)
    assert all(torch.equal(mine[k].to(v.dtype), v) for k, v in tensors.items())
    assert next(model.parameters()).dtype == torch.bfloat16  # (the download's dtype)
    assert (type(model).__name__ == "Qwen2_5OmniForConditionalGeneration") == talker
    if talker:
        assert set(model.speaker_map) == {"Chelsie", "Ethan"}
    expected = {"vl": "Qwen2_5_VLProcessor", "omni": "Qwen2_5OmniProcessor"}[name.split("-")[0]]
    assert type(processor).__name__ == (expected if HAS_TORCHVISION else "PilProcessor")


@pytest.mark.parametrize("run", ["vl-3b", "vl-7b"])
def test_a_qwen2_5_vl_download_round_trip(quantized, downloads, run):
    source, saved, ct, served = quantized[run]
    meta = json.loads((saved / "quant_config.json").read_text())
    assert meta["router"] == {"151655": "vision", "151656": "vision"}  # the real placeholder ids
    # the processor as it was (PilProcessor), or as transformers 5 saves it: one processor_config.json
    kept = ["processor_config.json"] if HAS_TORCHVISION else [
        "preprocessor_config.json", "video_preprocessor_config.json"]
    assert {*kept, "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in saved.iterdir()}
    model, processor = masquant.load(saved), processor_of(saved)
    assert type(processor).__name__ == ("Qwen2_5_VLProcessor" if HAS_TORCHVISION else "PilProcessor")
    batch = _prompt(processor, omni=False)
    assert int((batch["input_ids"] == 151655).sum()) == int(batch["image_grid_thw"].prod()) // 4
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
    assert isinstance(processor.decode(out[0, batch["input_ids"].shape[1]:]), str)
    full = load_hf(source)[0]
    ours = _logits(model, batch)
    assert _close(ours, _logits(full, batch)) > (0.99 if run == "vl-7b" else 0.9)
    # the compressed-tensors export (its text path, plus the sidecar) gives nearly the same logits
    from masquant.io.loading import load_any

    exported, ct_processor, _ = load_any(str(ct))
    assert _close(_logits(exported, _prompt(ct_processor, omni=False)), ours) > 0.95
    config = json.loads((served / "config.json").read_text())
    assert config["architectures"] == ["MasquantQwen2_5_VLForConditionalGeneration"]
    if HAS_TORCHVISION:
        assert "video_processor" in json.loads((served / "processor_config.json").read_text())
    else:
        assert (served / "video_preprocessor_config.json").read_text() == (
            source / "video_preprocessor_config.json").read_text()  # the download's own, not one made up


def test_a_full_omni_download_keeps_its_talker(quantized, downloads):
    source, saved, ct, served = quantized["omni-keep"]
    tensors = downloads["omni"][1]
    stored = load_file(str(saved / "model.safetensors"))
    speech = [k for k in tensors if k.startswith(("talker.", "token2wav."))]
    assert speech and all(torch.equal(stored[k].to(tensors[k].dtype), tensors[k]) for k in speech)  # as they were
    meta = json.loads((saved / "quant_config.json").read_text())
    assert meta["quantized_module"] == "thinker" and all(k.startswith("thinker.") for k in meta["linears"])
    assert set(meta["router"].values()) == {"vision", "audio"} and meta["router"]["151646"] == "audio"
    model, processor = masquant.load(saved), processor_of(saved)
    assert type(model).__name__ == "Qwen2_5OmniForConditionalGeneration" and set(model.speaker_map) == {"Chelsie",
                                                                                                        "Ethan"}
    batch = _prompt(processor, omni=True, audio=True)
    assert int((batch["input_ids"] == 151655).sum()) == int(batch["image_grid_thw"].prod()) // 4
    with torch.no_grad():
        ids = model.thinker.generate(**batch, max_new_tokens=3, do_sample=False)
        torch.manual_seed(0)
        _, wave = model.generate(**_prompt(processor, omni=True, image=False, audio=True), speaker="Ethan",
                                 thinker_max_new_tokens=2, talker_max_new_tokens=3, thinker_do_sample=False,
                                 token2wav_num_steps=2)
    assert ids.shape[1] == batch["input_ids"].shape[1] + 3
    assert wave.ndim == 1 and wave.numel() > 0 and bool(torch.isfinite(wave).all())  # speech from the kept talker
    full = load_hf(source)[0]
    assert _close(_logits(model.thinker, batch), _logits(full, batch)) > 0.95
    # exports hold the thinker, as vLLM serves Qwen2.5-Omni
    config = json.loads((served / "config.json").read_text())
    assert config["architectures"] == ["MasquantQwen2_5OmniThinkerForConditionalGeneration"]
    assert not (served / "spk_dict.pt").exists()
    assert all(k.startswith("thinker.") for k in load_file(str(served / "model.safetensors")))
    assert json.loads((ct / "config.json").read_text())["architectures"] == [
        "Qwen2_5OmniThinkerForConditionalGeneration"]


def test_a_full_omni_download_without_its_talker(quantized, downloads):
    source, saved, ct, served = quantized["omni-drop"]
    assert not (saved / "spk_dict.pt").exists()
    stored = load_file(str(saved / "model.safetensors"))
    assert not any(k.startswith(("talker.", "token2wav.", "thinker.")) for k in stored)
    model, processor = masquant.load(saved), processor_of(saved)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    batch = _prompt(processor, omni=True, audio=True)
    assert _close(_logits(model, batch), _logits(load_hf(source)[0], batch)) > 0.99
    from masquant.io.loading import load_any

    exported, ct_processor, _ = load_any(str(ct))
    assert _close(_logits(exported, _prompt(ct_processor, omni=True, audio=True)), _logits(model, batch)) > 0.95
    assert json.loads((served / "config.json").read_text())["thinker_config"]["model_type"] == "qwen2_5_omni_thinker"


@pytest.mark.parametrize("run", ["vl-3b", "omni-keep"])
def test_lmms_eval_scores_the_saved_model(quantized, run):
    """lmms-eval's ``masquant`` model on the saved directory: its score of an answer is the model's own
    log-probability of it after the prompt the model's processor makes."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from masquant.evaluation.lmms import MasquantLMM

    lm = MasquantLMM(pretrained=str(quantized[run][1]), device="cpu")
    omni = run.startswith("omni")
    doc = {"image": _image(7), **({"audio": {"array": CLIP, "sampling_rate": 16000}} if omni else {})}
    lm.task_dict = {"t": {"test": [doc]}}

    def visuals(d):
        return [d["image"], *([d["audio"]] if omni else [])]

    args = ("What is this item?", {"max_new_tokens": 3}, visuals, 0, "t", "test")
    (answer,) = lm.generate_until([Instance("generate_until", args, 0, {"task": "t", "doc_id": 0, "repeats": 1})])
    assert isinstance(answer, str)
    (score, _), = lm.loglikelihood([Instance("loglikelihood", ("What is this item?", "bag", *args[2:]), 0,
                                             {"task": "t", "doc_id": 0, "repeats": 1})])
    batch = _prompt(lm.processor, omni=omni, audio=omni)
    cont = lm.tokenizer("bag", add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = {**batch, "input_ids": torch.cat([batch["input_ids"], cont], 1),
            "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + cont.shape[1], dtype=torch.long)}
    if "mm_token_type_ids" in batch:
        full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(cont)], 1)
    logp = torch.log_softmax(_logits(lm.model, full), -1)
    start = batch["input_ids"].shape[1]
    expected = sum(float(logp[start - 1 + i, t]) for i, t in enumerate(cont[0].tolist()))
    assert score == pytest.approx(expected, abs=1e-3)


@pytest.mark.skipif(HAS_TORCHVISION, reason="transformers' own processor loads where torchvision is installed")
@pytest.mark.parametrize("name", ["vl-3b", "omni"])
def test_a_processor_saved_by_transformers_5_loads_without_torchvision(downloads, tmp_path, name):
    """A model saved where torchvision is installed keeps its processor as one ``processor_config.json``
    (no ``preprocessor_config.json``): the fallback reads it, and processes as the download's does."""
    source, saved = downloads[name][0], tmp_path / "saved"
    saved.mkdir()
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        shutil.copy2(source / file, saved / file)
    pre = json.loads((source / "preprocessor_config.json").read_text())
    video = {k: v for k, v in pre.items() if k != "image_processor_type"}
    nested = {"image_processor": pre, "processor_class": pre["processor_class"],
              "video_processor": {**video, "video_processor_type": "Qwen2VLVideoProcessor"},
              **({"feature_extractor": pre} if name == "omni" else {})}
    (saved / "processor_config.json").write_text(json.dumps(nested))
    ours, theirs = processor_of(saved), processor_of(source)
    assert isinstance(ours, PilProcessor) and ours.family == theirs.family
    a, b = _prompt(ours, omni=name == "omni", audio=name == "omni"), _prompt(theirs, omni=name == "omni",
                                                                           audio=name == "omni")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' Qwen2.5-Omni processor needs torchvision")
def test_the_fallback_gives_what_the_omni_processor_gives(downloads):
    """On an Omni download (<|IMAGE|>, <|AUDIO|> placeholders): the same tokens, audio features and grids."""
    from transformers import AutoProcessor

    path = downloads["omni"][0]
    theirs, ours = AutoProcessor.from_pretrained(path), PilProcessor.from_pretrained(path)
    a, b = _prompt(ours, omni=True, audio=True), _prompt(theirs, omni=True, audio=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    frames = int(a["feature_attention_mask"].sum())
    assert int(b["feature_attention_mask"].sum()) == frames
    assert torch.allclose(a["input_features"][..., :frames], b["input_features"][..., :frames], atol=1e-5)
    assert float((a["pixel_values"] - b["pixel_values"]).abs().mean()) < 1e-2


@pytest.mark.parametrize("run", ["vl-3b", "omni-keep"])
def test_the_vllm_export_serves_what_masquant_runs(quantized, run):
    """Served by vLLM with masquant's plugin (the vLLM venv): every prompt token's log-probability as
    masquant's runtime gives it, nearer to it than to the same model routed as text only."""
    pytest.importorskip("vllm")
    from masquant import Modality, modality_scope
    from masquant.serving.vllm_eval import VllmEngine

    _, saved, _, served = quantized[run]
    omni = run.startswith("omni")
    model = masquant.load(saved)
    model = (model.thinker if omni else model).float()  # (vLLM serves it in float32)
    processor = processor_of(served)
    batch = _prompt(processor, omni=omni, audio=omni)
    ids = batch["input_ids"][0].tolist()
    with torch.no_grad():
        routed = torch.log_softmax(_logits(model, batch).double(), -1)
        with modality_scope(model, torch.full_like(batch["input_ids"], int(Modality.TEXT))):
            text_only = torch.log_softmax(_logits(model, batch).double(), -1)
    targets = torch.tensor(ids[1:])
    items = {"images": [_image(7)], **({"audio": [CLIP]} if omni else {})}
    with VllmEngine(served, max_model_len=512) as engine:
        (logprobs,) = engine.token_logprobs([(ids, items)])
    lp = torch.tensor(logprobs[1:])
    gap = float((lp - routed[torch.arange(len(ids) - 1), targets]).abs().mean())
    unrouted = float((lp - text_only[torch.arange(len(ids) - 1), targets]).abs().mean())
    print(f"{run}: served vs runtime {gap:.2e}, vs text-only routing {unrouted:.2e}")
    assert gap < 1e-2 and gap < unrouted / 2, (gap, unrouted)


@pytest.mark.reliability(case="CLI quantize of a Hub-layout checkpoint it cannot take as given (--talker on "
                              "Qwen2.5-VL, --stream on a full Omni, an Omni without spk_dict.pt, a shard missing "
                              "a tensor)", expect="exit 1, one line naming what is wrong and how to fix it; "
                                                  "nothing written")
@pytest.mark.parametrize("case", ["talker-on-vl", "stream-full-omni", "no-speakers", "missing-tensor"])
def test_bad_input_is_one_clear_line(downloads, calib, tmp_path, capsys, case):
    from safetensors.torch import save_file

    name = {"talker-on-vl": "vl-3b", "missing-tensor": "vl-7b"}.get(case, "omni")
    source, flags = downloads[name][0], []
    if case in ("no-speakers", "missing-tensor"):
        copy = tmp_path / "download"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("spk_dict.pt"))
        source = copy
    if case == "missing-tensor":  # the last shard lost one tensor (an interrupted download)
        last = sorted(source.glob("model-*.safetensors"))[-1]
        part = load_file(str(last))
        part.pop(sorted(part)[0])
        save_file(part, str(last), metadata={"format": "pt"})
    flags = {"talker-on-vl": ["--talker", "drop"], "stream-full-omni": ["--stream"]}.get(case, [])
    out = tmp_path / "q"
    capsys.readouterr()
    code = main(["quantize", "--model", str(source), "--calib", str(calib[name.split("-")[0]]), "--method",
                 "smoothquant", "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("masquant: error")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err and not out.exists(), err[-2000:]
    expected = {"talker-on-vl": "--talker applies to full Qwen2.5-Omni checkpoints",
                "stream-full-omni": "which --stream does not read", "no-speakers": "has no spk_dict.pt",
                "missing-tensor": "do not fit Qwen2_5_VLForConditionalGeneration: 1 missing"}[case]
    assert expected in lines[0], lines[0]


def test_the_python_api_quantizes_a_full_omni_models_thinker(downloads, tmp_path):
    """``masquant.quantize(full_model, calib)`` as the CLI does: the thinker quantized, the speech parts
    untouched; the saved model loads as the full class."""
    from masquant.io.loading import load_any

    source, tensors = downloads["omni"]
    model, processor, _ = load_any(str(source), talker=True)
    calib = [_prompt(processor, omni=True, audio=True), _prompt(processor, omni=True, image=False, audio=True)]
    report = masquant.quantize(model, calib, masquant.QuantConfig(method="smoothquant"), progress=False)
    assert report.layers
    quantized = {n for n, m in model.named_modules() if isinstance(m, masquant.QuantLinear)}
    assert quantized and all(n.startswith("thinker.model.") for n in quantized)
    masquant.save(model, tmp_path / "saved", processor)
    loaded = masquant.load(tmp_path / "saved")
    assert type(loaded).__name__ == "Qwen2_5OmniForConditionalGeneration"
    stored = load_file(str(tmp_path / "saved" / "model.safetensors"))
    speech = [k for k in tensors if k.startswith(("talker.", "token2wav."))]
    assert speech and all(torch.equal(stored[k].to(tensors[k].dtype), tensors[k]) for k in speech)
