"""llm-compressor as a peer: its own recipes' checkpoints, scored like masquant's bench rows.

The recipes (``masquant.bench.llmc_recipes``) run in ``.venv-llmc`` (``./scripts/setup_llmcompressor.sh``:
llm-compressor pins transformers 5.17 and compressed-tensors 0.19); their compressed-tensors
checkpoints are then loaded here with ``from_pretrained``, as a user would, and scored by
``masquant.bench.accuracy``'s measures (task accuracy and NLL, prose perplexity, decoder-output SQNR
per modality and KL on the same held-out prompts, the same FULL / QUICK sizes).

    python -m masquant.bench.peers --out docs/results/peers.json [--quick] [--resume]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..evaluation.evaluate import compare
from ..refmodels import registry
from ..refmodels.evaluate import FULL, QUICK, comparison_inputs, evaluate_reference

log = logging.getLogger("masquant")

ROOT = Path(__file__).resolve().parents[3]  # the repository (masquant installed with -e)
RECIPES = {"sq+gptq": "W8A8", "gptq": "W4A16", "awq": "W4A16"}  # llm-compressor recipe -> bits
STORED = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")  # a quantized weight at rest


def method_name(recipe: str) -> str:
    return f"llmc:{recipe}"


def llmc_python(path: str | Path | None = None) -> Path:
    """The interpreter of the llm-compressor venv (``--llmc-python``, ``$MASQUANT_LLMC_PYTHON`` or ``.venv-llmc``)."""
    python = Path(path or os.environ.get("MASQUANT_LLMC_PYTHON") or ROOT / ".venv-llmc" / "bin" / "python")
    if not python.exists():
        raise FileNotFoundError(f"no llm-compressor interpreter at {python}: run ./scripts/setup_llmcompressor.sh "
                                "(it creates .venv-llmc), or pass --llmc-python / set MASQUANT_LLMC_PYTHON")
    return python


def run_recipes(name: str, recipes: list[str], out: Path, quick: bool, python: str | Path | None = None,
                every: int | None = None) -> None:
    """Run llm-compressor's recipes on one reference model in its venv; checkpoints go to ``out``
    (``every``: every N-th calibration sample instead of all, or every 4th when quick)."""
    cmd = [str(llmc_python(python)), "-m", "masquant.bench.llmc_recipes", "--model", name, "--out", str(out)]
    cmd += [arg for r in recipes for arg in ("--recipe", r)] + (["--quick"] if quick else [])
    cmd += ["--every", str(every)] if every else []
    log.info("%s: llm-compressor %s", name, ", ".join(recipes))
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor's recipes failed on {name} (exit {done.returncode}); "
                           f"the end of its output:\n{done.stderr[-4000:]}")
    for line in done.stdout.splitlines():
        log.info("%s", line)


def checkpoint(out: Path, name: str, recipe: str) -> Path:
    return out / f"{name}-{recipe.replace('+', '-')}"


def needs_dequantize(config: dict) -> bool:
    """True for a weight-only pack-quantized scheme with zero points (AWQ's W4A16_ASYM): transformers 5.25 +
    compressed-tensors 0.20 build those layers' zero points unpacked and refuse the checkpoint's packed
    ones (size mismatch), so such a checkpoint loads with ``dequantize=True``; for weight-only schemes
    that is the same forward (the weights are dequantized either way, activations stay in float)."""
    q = config.get("quantization_config", {})
    groups = q.get("config_groups", {}).values()
    return (q.get("format") == "pack-quantized" and all(g.get("input_activations") is None for g in groups)
            and any(not g["weights"].get("symmetric", True) for g in groups))


def load_checkpoint(path: Path):
    """``(model, how)``: a compressed-tensors checkpoint through transformers' ``from_pretrained``, refusing a
    load that left weights missing or unused (e.g. a tower stored in float but listed as quantized)."""
    from transformers import AutoConfig, CompressedTensorsConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as VL
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Omni

    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        raise ValueError(f"{path}/config.json has no quantization_config: not a compressed-tensors checkpoint")
    cls = Omni if AutoConfig.from_pretrained(path).model_type == "qwen2_5_omni_thinker" else VL
    dequantize = needs_dequantize(config)
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model, info = cls.from_pretrained(path, output_loading_info=True, **extra)
    how = "from_pretrained(dequantize=True)" if dequantize else "from_pretrained"
    bad = {k: sorted(v)[:6] for k, v in info.items() if k != "error_msgs" and v}
    if bad:
        raise ValueError(f"{path} does not load cleanly in transformers: {bad}; its quantization config's `ignore` "
                         "may miss layers stored in float (llmc_recipes.fix_ignore adds the recipe's patterns)")
    return model.eval(), how


def quantized_layers(path: Path) -> dict[str, dict[str, tuple]]:
    """``{layer: {tensor: (dtype, shape)}}`` of every quantized linear stored in the checkpoint."""
    from safetensors import safe_open

    layers: dict[str, dict[str, tuple]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            keys = set(f.keys())
            for key in keys:
                layer, _, tensor = key.rpartition(".")
                if tensor in STORED and f"{layer}.weight_scale" in keys:
                    t = f.get_slice(key)
                    layers.setdefault(layer, {})[tensor] = (t.get_dtype(), tuple(t.get_shape()))
    return layers


_BYTES = {"I8": 1, "U8": 1, "I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2}


def storage_bytes(path: Path) -> dict[str, int]:
    """Bytes at rest of the quantized decoder linears (codes, scales, zero points; no bias), as masquant
    counts its own (``bench.accuracy.storage_bytes``); the towers and ``lm_head`` are not quantized."""
    total = 0
    for tensors in quantized_layers(path).values():
        for dtype, shape in tensors.values():
            total += _BYTES[dtype] * int(torch.Size(shape).numel())
    return {"weight": total, "patches": 0}


def score(path: Path, fp, processor, name: str, quick: bool, held_out: list[dict]) -> dict:
    """One row: the checkpoint's recipe run (``run.json``) and masquant's measures on it."""
    run = json.loads((path / "run.json").read_text())
    qmodel, how = load_checkpoint(path)
    sizes = QUICK if quick else FULL
    with torch.no_grad():
        scores = compare(fp, qmodel, held_out)
        row = {"model": name, "bits": run["bits"], "method": method_name(run["recipe"]), "quick": quick,
               **evaluate_reference(qmodel, processor, name, sizes),
               "decoder_sqnr": scores["decoder_sqnr"], "kl": scores["kl"]["all"],
               "calib_seconds": run["calib_seconds"], "storage": storage_bytes(path),
               "calib_samples": run["calib_samples"],
               "llmc": {"versions": run["versions"], "ignore": run["ignore"], "narrow_ignored": run["narrow_ignored"],
                        "loaded_with": how}}
    return row


def _key(row: dict) -> tuple:
    return row["model"], row["bits"], row["method"], row.get("quick", False)


def reusable(path: Path, quick: bool) -> bool:
    """A finished checkpoint of this setting (its ``run.json`` is written last)."""
    run = path / "run.json"
    return run.exists() and json.loads(run.read_text()).get("quick") == quick


def peer_rows(model_name: str, quick: bool, recipes: list[str] | None = None, workdir: Path | None = None,
              done: list[dict] = (), llmc_python_path: str | Path | None = None, on_row=None,
              reuse_checkpoints: bool = False) -> list[dict]:
    """llm-compressor's rows on one reference model (``method`` ``llmc:<recipe>``), in ``run_settings``' format.

    Rows in ``done`` (same model, bits, method and ``quick``) are reused; the recipes run only for
    the others. Checkpoints go to ``workdir`` (a temporary folder when None); with ``reuse_checkpoints``
    finished ones already there are scored without rerunning. ``on_row(rows)`` follows each new row.
    """
    recipes = list(recipes or RECIPES)
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown llm-compressor recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    previous = {_key(r): r for r in done}
    todo = [r for r in recipes if (model_name, RECIPES[r], method_name(r), quick) not in previous]
    with tempfile.TemporaryDirectory(prefix="llmc-") as tmp:
        out = Path(workdir) if workdir is not None else Path(tmp)
        run = [r for r in todo if not (reuse_checkpoints and reusable(checkpoint(out, model_name, r), quick))]
        if run:
            run_recipes(model_name, run, out, quick, llmc_python_path)
        if todo:
            fp, processor = registry.load(model_name)
            held_out = comparison_inputs(processor, model_name, n=8 if quick else 24)
        rows = []
        for recipe in recipes:
            key = (model_name, RECIPES[recipe], method_name(recipe), quick)
            if key in previous:
                rows.append(previous[key])
                continue
            row = score(checkpoint(out, model_name, recipe), fp, processor, model_name, quick, held_out)
            log.info("%s %s %s: prose ppl %.2f, SQNR %s, KL %.4f", model_name, row["bits"], row["method"],
                     row["prose_ppl"], {m: round(v, 1) for m, v in row["decoder_sqnr"].items()}, row["kl"])
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llm-compressor's recipes on the reference models, scored by masquant")
    parser.add_argument("--out", type=Path, required=True, help="the rows, as JSON (rewritten after each row)")
    parser.add_argument("--model", action="append", choices=registry.REFERENCE_MODELS, help="default: both")
    parser.add_argument("--recipe", action="append", choices=list(RECIPES), help="default: all three")
    parser.add_argument("--quick", action="store_true", help="masquant's quick sizes (every 4th calibration sample)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rows already in --out (and finished checkpoints in --workdir)")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    parser.add_argument("--llmc-python", help="the llm-compressor venv's python (default: .venv-llmc/bin/python)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        llmc_python(args.llmc_python)
    except FileNotFoundError as e:
        sys.exit(str(e))
    done = json.loads(args.out.read_text()) if args.resume and args.out.exists() else []
    rows: list[dict] = []

    def save(new: list[dict]) -> None:
        merged = {_key(r): r for r in [*done, *rows, *new]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(list(merged.values()), indent=1))
        tmp.replace(args.out)

    for name in args.model or registry.REFERENCE_MODELS:
        rows += peer_rows(name, args.quick, args.recipe, args.workdir and args.workdir / name, done,
                          args.llmc_python, save, reuse_checkpoints=args.resume)
    save([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
