"""vLLM throughput for ``masquant bench --serving``: of any served directory (``throughput``,
``speed_only``), and of a random Qwen2.5-VL with 3B-wide decoder layers in FP32, BF16, W8A8
compressed-tensors (vLLM's own int8 kernels) and MASQuant W8A8 routed and with routing off."""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config import QuantConfig
from ..io.export_vllm import export_vllm
from ..io.serialization import save
from ..refmodels import registry

log = logging.getLogger("masquant")

DECODE_TOKENS = 32


def throughput(engine, requests: list) -> dict[str, float]:
    """Tokens per second: prefill of the prompts (one token generated), and decoding ``DECODE_TOKENS``
    more for the same batch (the difference of the two runs); best of three after a warm-up run."""
    from vllm import SamplingParams

    prompts = [engine._prompt(ids, items) for ids, items in requests]
    timings, tokens = {}, 0
    for steps in (1, 1 + DECODE_TOKENS):
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        outs = engine.llm.generate(prompts, params, use_tqdm=False)  # (warm: kernels compiled for these shapes)
        tokens = sum(len(out.prompt_token_ids) for out in outs)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            engine.llm.generate(prompts, params, use_tqdm=False)
            runs.append(time.perf_counter() - start)
        timings[steps] = min(runs)
    decode = max(timings[1 + DECODE_TOKENS] - timings[1], 1e-9)
    return {"prefill_tok_s": tokens / timings[1], "decode_tok_s": len(prompts) * DECODE_TOKENS / decode,
            "prompt_tokens": tokens / len(prompts)}


def speed_only(directory: Path, speed_requests, dtype: str = "float32", routing: bool = True) -> dict:
    """Throughput alone, in ``dtype``, with or without masquant's routing (``MASQUANT_ROUTING``)."""
    from ..serving.vllm_eval import VllmEngine

    os.environ["MASQUANT_ROUTING"] = "1" if routing else "0"  # (read in the engine's worker)
    try:
        with VllmEngine(directory, dtype=dtype, enable_prefix_caching=False) as engine:
            return throughput(engine, speed_requests)
    finally:
        os.environ.pop("MASQUANT_ROUTING", None)


WIDE = {"hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16, "num_key_value_heads": 2,
        "num_hidden_layers": 2}  # Qwen2.5-VL-3B's decoder widths, two layers
WIDE_IMAGE = 224  # pixels a side: 256 image tokens per prompt


def wide_checkpoints(root: Path) -> dict[str, Path]:
    """A random Qwen2.5-VL with 3B-wide decoder layers, ref-vl's vision tower and processor (images
    of ``WIDE_IMAGE`` pixels): full precision, W8A8 RTN as compressed-tensors, and W8A8 with random
    vision vectors and rank-32 patches (``bench.speed.synthetic_quantize``: speed only), each as
    vLLM serves it."""
    import json
    import shutil

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .speed import synthetic_quantize

    ref = registry.model_dir("ref-vl")
    config = json.loads((ref / "config.json").read_text())
    config["text_config"].update(WIDE)
    config["text_config"]["layer_types"] = ["full_attention"] * WIDE["num_hidden_layers"]
    config["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]  # (head dim 128, as Qwen's)
    config["vision_config"]["out_hidden_size"] = WIDE["hidden_size"]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).eval()
    fp = root / "wide-fp"
    model.save_pretrained(fp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy2(ref / name, fp / name)
    pre = json.loads((ref / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": WIDE_IMAGE ** 2, "longest_edge": WIDE_IMAGE ** 2}
    (fp / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    dirs = {"fp": fp}
    for label, rank in (("rtn", 0), ("masquant", 32)):
        quantized = synthetic_quantize(copy.deepcopy(model), 8, rank=rank)
        quantized.masquant_config = QuantConfig(method=label, w_bits=8, a_bits=8, **({"rank": rank} if rank else {}))
        saved = root / f"wide-{label}"
        save(quantized, saved)
        for path in fp.iterdir():
            if path.name not in ("config.json", "model.safetensors") and not (saved / path.name).exists():
                shutil.copy2(path, saved / path.name)
        if rank:
            export_vllm(saved, root / "wide-q-vllm")
            dirs[label] = root / "wide-q-vllm"
        else:  # what llm-compressor users serve: compressed-tensors W8A8, vLLM's own int8 kernels, the text path
            dirs[label] = _compressed_tensors(saved, root / "wide-ct")
    return dirs


def _compressed_tensors(saved: Path, out: Path) -> Path | None:
    """The compressed-tensors export of ``saved`` (None, logged, where this venv's compressed-tensors
    cannot write it)."""
    from ..io.export import export_compressed_tensors

    try:
        export_compressed_tensors(saved, out)
    except Exception as err:  # (a compressed-tensors release the export does not support)
        log.warning("no compressed-tensors row: the export failed here (%s: %s)", type(err).__name__, str(err)[:200])
        return None
    return out


def wide_rows(root: Path, prompts: int = 8) -> list[dict]:
    """vLLM throughput on the 3B-wide model: FP32, BF16, W8A8 compressed-tensors (vLLM's own int8
    kernels), MASQuant W8A8 routed and with routing off."""
    from PIL import Image

    dirs = wide_checkpoints(root)
    rng = np.random.default_rng(0)
    tokens = registry.load("ref-vl")[1].tokenizer
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this item?<|im_end|>\n" \
           "<|im_start|>assistant\n"
    requests = [(tokens(text)["input_ids"], {"images": [Image.fromarray(
        rng.integers(0, 256, (WIDE_IMAGE, WIDE_IMAGE, 3), dtype=np.uint8))]}) for _ in range(prompts)]
    rows = []
    for label, directory, dtype, routing in (("FP32", dirs["fp"], "float32", True),
                                             ("BF16", dirs["fp"], "bfloat16", True),
                                             ("W8A8 compressed-tensors (vLLM's int8 kernels; the text path only)",
                                              dirs["rtn"], "float32", True),
                                             ("masquant W8A8 (random vectors, rank-32 patches)", dirs["masquant"],
                                              "float32", True),
                                             ("masquant W8A8, routing off (every token text, no patches)",
                                              dirs["masquant"], "float32", False)):
        if directory is None:
            continue
        speed = speed_only(directory, requests, dtype=dtype, routing=routing)
        log.info("3B-wide %s: %s", label, speed)
        rows.append({"setting": label, **speed})
    return rows


def wide_markdown(result: dict) -> str:
    lines = []
    if result["wide"]:
        first = result["wide"][0]
        lines += ["", f"## Throughput at Qwen2.5-VL-3B width (random weights, 2 decoder layers; 8 prompts of "
                  f"{first['prompt_tokens']:.0f} tokens, 256 of them image; {DECODE_TOKENS} decoded tokens each)", "",
                  "| setting | prefill tok/s | decode tok/s | prefill vs FP32 | decode vs FP32 |",
                  "|---|---|---|---|---|"]
        for w in result["wide"]:
            lines.append(f"| {w['setting']} | {w['prefill_tok_s']:.0f} | {w['decode_tok_s']:.1f} | "
                         f"{w['prefill_tok_s'] / first['prefill_tok_s']:.2f}x | "
                         f"{w['decode_tok_s'] / first['decode_tok_s']:.2f}x |")
    return "\n".join(lines)
