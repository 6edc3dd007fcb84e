"""llm-compressor's own recipes on masquant's reference models (run in .venv-llmc).

Each recipe is llm-compressor's ``oneshot`` with its own modifiers, calibrated on the samples
masquant calibrates on (``masquant.refmodels.evaluate.calibration_inputs``); vision and audio
towers and ``lm_head`` are left in full precision, as llm-compressor's Qwen2.5-VL example does.
Writes one compressed-tensors checkpoint per recipe (with the processor files) and its ``run.json``
(oneshot wall time, sample count, versions, ignored layers). Imports llm-compressor only when run:

    .venv-llmc/bin/python -m masquant.bench.llmc_recipes --model ref-vl --out out/llmc [--quick]

``python -m masquant.bench.peers`` runs this, then scores the checkpoints in the main venv.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import shutil
import sys
import time
from pathlib import Path

RECIPES = {"sq+gptq": "W8A8", "gptq": "W4A16", "awq": "W4A16"}
TOWERS = ["lm_head", "re:.*visual.*", "re:.*audio_tower.*"]  # left in full precision
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                   "masquant_processor.json")
GROUP = 128  # llm-compressor's W4A16 group size


def decoder_prefix(model) -> str:
    """Dotted name of the language model's layer list (``model.language_model.layers``, ``model.layers``)."""
    import torch

    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module)
                and type(module[0]).__name__.endswith("DecoderLayer")):
            return name
    raise ValueError(f"{type(model).__name__} has no list of *DecoderLayer modules: not a supported decoder")


def narrow_layers(model, prefix: str) -> list[str]:
    """Decoder linears whose input width is no multiple of the group size (they cannot be grouped)."""
    import torch

    return [name for name, m in model.named_modules()
            if name.startswith(prefix + ".") and isinstance(m, torch.nn.Linear) and m.in_features % GROUP]


def in_decoder(pattern: str, prefix: str) -> str:
    """One of llm-compressor's default mapping patterns (``re:.*q_proj$``) held to the decoder's layers."""
    return "re:^" + prefix.replace(".", r"\.") + r"\.\d+\." + pattern.removeprefix("re:")


def modifiers(recipe: str, prefix: str, ignore: list[str]) -> list:
    """llm-compressor's modifiers for one recipe. SmoothQuant and AWQ get their own default mappings held
    to the decoder: as given, those also match the vision blocks' ``gate_proj``/``up_proj`` and the audio
    tower's ``q/k/v_proj`` and stop with "must match a single smooth layer for each mapping"."""
    from llmcompressor.modifiers.awq import AWQMapping, AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.awq.mappings import default_mappings
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform.smoothquant.utils import DEFAULT_SMOOTHQUANT_MAPPINGS

    if recipe == "sq+gptq":
        mappings = [[[in_decoder(b, prefix) for b in m.balance_layers], in_decoder(m.smooth_layers, prefix)]
                    for m in DEFAULT_SMOOTHQUANT_MAPPINGS]
        return [SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if recipe == "gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if recipe == "awq":
        mappings = [AWQMapping(in_decoder(m.smooth_layer, prefix), [in_decoder(b, prefix) for b in m.balance_layers])
                    for m in default_mappings]
        return [AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=ignore, mappings=mappings)]
    raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")


class _Captured(Exception):
    pass


def decoder_inputs(model, prefix: str, samples: list[dict]) -> list[dict]:
    """What the language model receives for each sample (embeddings with the towers' features merged in,
    M-RoPE positions, mask), from the full-precision towers, which no recipe quantizes.

    llm-compressor's sequential pipeline traces the model once, on the first batch, and needs every batch
    to carry the same inputs; masquant's calibration set mixes text-only, image, audio and image+audio
    prompts, so the recipes calibrate on these uniform decoder inputs instead (the decoder sees the same).
    """
    import torch

    rows: list[dict] = []

    def grab(_module, _args, kwargs):
        embeds, positions = kwargs["inputs_embeds"], kwargs["position_ids"]
        if positions is None:  # text only: what the text model does without positions (no cache)
            positions = torch.arange(embeds.shape[1]).view(1, 1, -1).expand(3, embeds.shape[0], -1)
        rows.append({"inputs_embeds": embeds.detach().clone(), "position_ids": positions.clone(),
                     "attention_mask": kwargs["attention_mask"].clone()})
        raise _Captured

    handle = model.get_submodule(prefix.rpartition(".")[0]).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for sample in samples:
                try:
                    model(**{k: v for k, v in sample.items() if k != "labels"})
                except _Captured:
                    continue
                raise RuntimeError(f"{type(model).__name__}'s forward never called its language model {prefix!r}")
    finally:
        handle.remove()
    return rows


def loader(rows: list[dict]):
    """A DataLoader of one decoder input per batch."""
    from torch.utils.data import DataLoader

    return DataLoader(rows, batch_size=1, shuffle=False, collate_fn=lambda batch: batch[0])


def fix_ignore(config: Path, ignore: list[str]) -> None:
    """Add the recipe's own ignore patterns to the saved quantization config.

    llm-compressor (compressed-tensors 0.19) writes the ignore list in checkpoint key names
    (``visual.blocks.0.attn.qkv``) while transformers 5 matches it against module names
    (``model.visual.blocks.0.attn.qkv``): without this, every tower linear loads as a quantized
    layer whose weights are missing, i.e. random (in transformers 5.17 as in 5.25).
    """
    data = json.loads(config.read_text())
    listed = data["quantization_config"]["ignore"]
    listed += [p for p in ignore if p not in listed]
    config.write_text(json.dumps(data, indent=2) + "\n")


def allow_cpu_only() -> None:
    """llm-compressor 0.14.0.1's AWQ pins its cached activations (``Tensor.pin_memory``), which raises
    "Cannot access accelerator device" on a machine without one; pinning only speeds copies to an
    accelerator, so there it is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)


def run_recipe(name: str, recipe: str, out: Path, quick: bool, every: int | None = None) -> dict:
    """One recipe on one model: every ``every``-th calibration sample (quick: 4th, as masquant's quick rows)."""
    from llmcompressor import oneshot
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    from masquant.refmodels import registry
    from masquant.refmodels.evaluate import calibration_inputs

    model, processor = registry.load(name)
    samples = calibration_inputs(processor, name)[:: every or (4 if quick else 1)]
    prefix = decoder_prefix(model)
    narrow = narrow_layers(model, prefix) if RECIPES[recipe] == "W4A16" else []
    ignore = TOWERS + narrow
    start = time.perf_counter()
    data = loader(decoder_inputs(model, prefix, samples))
    # oneshot on the language model itself: traced through the whole Omni thinker, whose forward passes
    # **kwargs to it, llm-compressor's sequential pipeline finds one subgraph and never runs the layers
    decoder = model.get_submodule(prefix.rpartition(".")[0])
    layers = decoder.get_submodule("layers")
    own_name = decoder.config.name_or_path
    decoder.config.name_or_path = model.config.name_or_path  # oneshot reads the checkpoint's config from here
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        oneshot(model=decoder, processor=processor.tokenizer, dataset=data, recipe=modifiers(recipe, "layers", ignore),
                num_calibration_samples=len(samples), sequential_targets=[type(layers[0]).__name__])
    finally:
        for hook in hooks:
            hook.remove()
        decoder.config.name_or_path = own_name
    seconds = time.perf_counter() - start
    if min(calls) < len(samples):
        raise RuntimeError(f"{name} {recipe}: llm-compressor's calibration ran the decoder layers {calls} times "
                           f"for {len(samples)} samples; its checkpoint would not be calibrated")
    target = out / f"{name}-{recipe.replace('+', '-')}"
    if target.exists():
        shutil.rmtree(target)
    modify_save_pretrained(model)  # llm-compressor's compressed save, for the whole model
    model.save_pretrained(target, save_compressed=True)
    fix_ignore(target / "config.json", ignore)
    for file in PROCESSOR_FILES:
        if (registry.model_dir(name) / file).exists():
            shutil.copy(registry.model_dir(name) / file, target / file)
    info = {"model": name, "recipe": recipe, "bits": RECIPES[recipe], "quick": quick, "dir": target.name,
            "calib_seconds": seconds, "calib_samples": len(samples), "ignore": ignore, "narrow_ignored": narrow,
            "versions": {d: metadata.version(d) for d in ("llmcompressor", "torch", "transformers",
                                                          "compressed-tensors")}}
    (target / "run.json").write_text(json.dumps(info, indent=1))
    print(f"{name} {recipe}: oneshot {seconds:.1f} s on {len(samples)} samples -> {target}", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="ref-vl / ref-omni (repeatable)")
    parser.add_argument("--recipe", action="append", choices=list(RECIPES), help="default: all")
    parser.add_argument("--out", type=Path, required=True, help="one checkpoint folder per model and recipe here")
    parser.add_argument("--quick", action="store_true", help="every 4th calibration sample, as masquant's quick rows")
    parser.add_argument("--every", type=int, help="every N-th calibration sample instead (the tests: fewer)")
    args = parser.parse_args(argv)
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        sys.exit("llmcompressor is not installed in this interpreter; run ./scripts/setup_llmcompressor.sh "
                 "and use .venv-llmc/bin/python")
    args.out.mkdir(parents=True, exist_ok=True)
    allow_cpu_only()
    for name in args.model:
        for recipe in args.recipe or list(RECIPES):
            run_recipe(name, recipe, args.out, args.quick, args.every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
