"""Serving in vLLM with masquant's plugin (needs the vLLM venv: scripts/setup_vllm.sh, then
``.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_serving.py``; skipped elsewhere).

A MASQuant W4A8 ref-vl and ref-omni model, each exported with ``--format vllm`` and served by an
engine whose steps take at most 16 tokens, so every prompt is prefilled in chunks (an image, a video
or a spoken clip split across two), requests share steps, and prefix caching is on. Every served
log-probability is compared with masquant's own runtime on the same token ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from masquant import Modality, QuantConfig, modality_scope, quantize, save
from masquant.bench.serving import runtime_inputs
from masquant.config import options_for
from masquant.io.export_vllm import export_vllm
from masquant.refmodels import registry
from masquant.refmodels.evaluate import audio_messages, calibration_inputs, match_messages
from masquant.refmodels.processor import to_rgb
from masquant.refmodels.tasks import qa_messages

pytestmark = pytest.mark.vllm

STEP_TOKENS = 16  # the engine's token budget per step: chunked prefill on every prompt here
N_IMAGES = 8
BLOCK = 32  # KV-cache block (the CPU backend takes multiples of 32): prefix caching reuses whole blocks


@pytest.fixture(scope="module", params=["ref-vl", "ref-omni"])
def served(request, tmp_path_factory):
    from masquant.serving.vllm_eval import VllmEngine

    name, root = request.param, tmp_path_factory.mktemp("vllm")
    model, processor = registry.load(name)
    calib = calibration_inputs(processor, name)[::4]
    quantize(model, calib, QuantConfig(method="masquant", w_bits=4, a_bits=8, rank=32, epochs=1), progress=False)
    save(model, root / "q", processor=processor, reference=name)
    export_vllm(root / "q", root / "served")
    with VllmEngine(root / "served", max_model_len=256, max_num_batched_tokens=STEP_TOKENS,
                    enable_prefix_caching=True, block_size=BLOCK) as engine:
        yield model, processor, engine, name


# (frames, frames per second): clips to which transformers 5 and vLLM give the same positions
# (Qwen2.5-VL: the text after a video, start + frame side there, last position + 1 here;
# the Omni thinker: the time positions of rates other than 2 fps)
CLIPS = {"ref-vl": ((2, 2.0), (4, 4.0)), "ref-omni": ((2, 2.0), (4, 2.0))}


def _requests(processor, name: str, answer: bool = True) -> list:
    """Media prompts (image questions, short videos; with audio: spoken words, and image + word
    pairs), then prose."""
    test = registry.slices(name, "test")
    media = [(qa_messages("item", i % 5), {"images": [to_rgb(test["item"][0][i])]}) for i in range(N_IMAGES)]
    if "word" in test:
        clips = test["word"][0]
        media = media[: N_IMAGES // 2] + [(audio_messages(i % 5), {"audio": [clips[i]]}) for i in range(3)] + [
            (match_messages(0), {"images": [to_rgb(test["item"][0][0])], "audio": [clips[5]]})]
    frames = [to_rgb(image) for image in test["item"][0][10:14]]
    media += [(qa_messages("item", n, media="video"), {"videos": [frames[:n]], "fps": [fps]})
              for n, fps in CLIPS[name]]
    out, reply = [], [{"role": "assistant", "content": "bag"}] if answer else []
    for messages, items in media:
        text = processor.apply_chat_template([*messages, *reply], add_generation_prompt=not answer)
        out.append((processor([text], **items)["input_ids"][0].tolist(), items))
    return out + [(processor.tokenizer(p)["input_ids"][:40], {}) for p in test["prose"][:2]]


@torch.no_grad()
def _runtime_logprobs(model, processor, ids, items, text_only: bool = False) -> np.ndarray:
    """masquant's runtime on the same token ids: ``[tokens, vocab]`` log-probabilities of the next token."""
    batch = runtime_inputs(model, processor, ids, items)
    if text_only:
        with modality_scope(model, torch.full_like(batch["input_ids"], int(Modality.TEXT))):
            logits = model(**batch, use_cache=False).logits[0]
    else:
        logits = model(**batch, use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1).numpy()


def _gaps(served, text_only: bool = False) -> list[float]:
    model, processor, engine, name = served
    requests = _requests(processor, name)
    gaps = []
    for (ids, items), lp in zip(requests, engine.token_logprobs(requests), strict=True):
        ours = _runtime_logprobs(model, processor, ids, items, text_only)
        gaps.append(float(np.abs(lp[1:] - ours[np.arange(len(ids) - 1), ids[1:]]).mean()))
    return gaps


def test_served_log_probabilities_match_the_runtime(served):
    """Batched, chunked (an image or clip split across steps) prefill of media and text prompts: every
    token's log-probability as masquant's runtime gives it, up to activation codes that float noise
    (other summation orders in the engine's threads) rounds the other way now and then; routing the
    media tokens as text is far off."""
    gaps = np.array(_gaps(served))
    media, texts = gaps[:-2], gaps[-2:]
    assert np.median(media) < 5e-4 and media.max() < 2e-2 and texts.max() < 1e-4, gaps
    unrouted = np.array(_gaps(served, text_only=True))
    assert (unrouted[:-2] > 5 * media).all(), (gaps, unrouted)  # every media prompt (videos too) needs its routes
    assert np.abs(unrouted[-2:] - texts).max() < 1e-6  # text prompts: one route either way


def test_prefix_cache_and_decoding_keep_the_routes(served):
    """A prompt whose image is in the prefix cache, and the tokens decoded after it (text), give
    the runtime's next-token distributions."""
    from vllm import SamplingParams

    model, processor, engine, name = served
    ids, items = _requests(processor, name, answer=False)[0]
    prompt = engine._prompt(ids, items)
    engine.llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # fills the cache
    out = engine.llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, logprobs=-1),
                              use_tqdm=False)[0]
    assert out.num_cached_tokens >= BLOCK  # the block holding the image came from the cache
    generated = list(out.outputs[0].token_ids)
    ours = _runtime_logprobs(model, processor, ids + generated[:-1], items)[len(ids) - 1:]
    for step, dist in enumerate(out.outputs[0].logprobs):
        theirs = np.full(ours.shape[1], -np.inf)
        for token, lp in dist.items():
            theirs[token] = lp.logprob
        kl = float((np.exp(ours[step]) * (ours[step] - theirs)).sum())
        assert kl < 1e-3, (step, kl)


def test_a_compiling_engine_runs_the_routes_eagerly(served, tmp_path):
    """vLLM's CPU default traces the model once with torch.compile, which would freeze one step's
    routes: the routed model turns compilation off, and the engine gives the eager one's values."""
    from masquant.serving.vllm_eval import VllmEngine

    _, processor, engine, name = served
    if name != "ref-vl":
        pytest.skip("one model is enough")
    requests = _requests(processor, name)[:2]
    directory = engine.llm.llm_engine.model_config.model
    with VllmEngine(directory, max_model_len=256, enforce_eager=False) as compiling:
        theirs = compiling.token_logprobs(requests)
    for ours, lp in zip(engine.token_logprobs(requests), theirs, strict=True):
        assert np.abs(ours[1:] - lp[1:]).max() < 1e-4


def test_the_routed_model_turns_compilation_and_cuda_graphs_off(monkeypatch):
    """What vLLM would trace or capture once (torch.compile, CUDA graphs) would replay one step's
    routes: the routed model's config turns both off, and a forward inside a capture is refused."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig, CompilationMode
    from vllm.config.compilation import CUDAGraphMode

    from masquant.serving import vllm_models

    config = SimpleNamespace(compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                                                                  cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE))
    vllm_models._eager(config)
    assert config.compilation_config.mode == CompilationMode.NONE
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    monkeypatch.setattr(vllm_models, "_capturing", lambda: True)
    routed = object.__new__(vllm_models.MasquantQwen2_5_VLForConditionalGeneration)
    routed.__dict__["masquant_router"] = object()
    with pytest.raises(RuntimeError, match="enforce-eager"):
        routed.forward()


def _drop_patches(model, names: set[str]) -> None:
    from masquant.runtime.qlinear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            for name in names & set(m.patches):
                del m.patches[name]


@pytest.mark.parametrize("method,options", [("masquant", {"text_patch": True}), ("lrc", {})])
def test_text_and_shared_patches_are_served(method, options, tmp_path):
    """MASQuant's text patch and lrc's patch for every token (names ``text`` and ``all`` in the export):
    the engine applies them to text rows too, as the runtime does (without them the runtime is far off)."""
    from masquant.serving.vllm_eval import VllmEngine

    model, processor = registry.load("ref-vl")
    calib = calibration_inputs(processor, "ref-vl")[::4]
    settings = options_for(method, rank=32, epochs=1, **options)
    quantize(model, calib, QuantConfig(method=method, w_bits=4, a_bits=8, **settings), progress=False)
    save(model, tmp_path / "q", processor=processor, reference="ref-vl")
    export_vllm(tmp_path / "q", tmp_path / "served")
    with VllmEngine(tmp_path / "served", max_model_len=256, max_num_batched_tokens=STEP_TOKENS) as engine:
        gaps = np.array(_gaps((model, processor, engine, "ref-vl")))
        _drop_patches(model, {"text", "all"})
        unpatched = np.array(_gaps((model, processor, engine, "ref-vl")))
    assert np.median(gaps) < 5e-4 and gaps.max() < 2e-2, gaps
    texts = f"text prompts: {gaps[-2:]} served, {unpatched[-2:]} unpatched"
    assert gaps[-2:].max() < 2e-3 and (unpatched[-2:] > 20 * gaps[-2:]).all(), texts  # patched in the engine


def test_greedy_answers_match_the_runtime(served):
    """The generative tasks through the engine (``generate_greedy``): the same greedy answers as the runtime."""
    from masquant.refmodels.generation import generate_answers

    model, processor, engine, name = served
    images = registry.slices(name, "test")["item"][0][:12]
    prompts = [(qa_messages("item", i % 5), {"images": [to_rgb(x)]}) for i, x in enumerate(images)]
    ours = generate_answers(model, processor, prompts, max_new_tokens=4)
    theirs = generate_answers(engine, processor, prompts, max_new_tokens=4)
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= 11, (ours, theirs)
    assert len(set(ours)) > 1  # answers that depend on the image
