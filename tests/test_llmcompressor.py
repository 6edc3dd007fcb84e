"""llm-compressor as a peer (``masquant.bench.peers``): its own recipes run in ``.venv-llmc``
(``./scripts/setup_llmcompressor.sh``), their checkpoints load through transformers here, and score
in masquant's row format. Run with ``python -m pytest -m llmcompressor tests/test_llmcompressor.py``
(the default run leaves them out); the two tests without the marker need no llm-compressor."""

from __future__ import annotations

import json

import pytest
import torch

from masquant.bench import peers
from masquant.bench.accuracy import markdown
from masquant.evaluation.evaluate import compare
from masquant.refmodels import registry
from masquant.refmodels.evaluate import comparison_inputs

NAME = "ref-vl"
RECIPES = list(peers.RECIPES)
GRID = {"sq+gptq": (-128, 127), "gptq": (-8, 7), "awq": (-8, 7)}  # compressed-tensors' signed codes (AWQ: + zero point)


def test_a_missing_llmc_venv_names_the_setup_script(tmp_path, monkeypatch):
    monkeypatch.delenv("MASQUANT_LLMC_PYTHON", raising=False)
    with pytest.raises(FileNotFoundError, match=r"setup_llmcompressor\.sh"):
        peers.llmc_python(tmp_path / "nothing" / "python")
    with pytest.raises(SystemExit, match=r"setup_llmcompressor\.sh"):
        peers.main(["--out", str(tmp_path / "rows.json"), "--llmc-python", str(tmp_path / "python")])


def test_only_weight_only_asymmetric_packed_schemes_load_dequantized():
    def config(fmt, symmetric, acts):
        group = {"weights": {"num_bits": 4, "symmetric": symmetric}, "input_activations": acts}
        return {"quantization_config": {"format": fmt, "config_groups": {"group_0": group}}}

    assert peers.needs_dequantize(config("pack-quantized", False, None))
    assert not peers.needs_dequantize(config("pack-quantized", True, None))
    assert not peers.needs_dequantize(config("int-quantized", True, {"num_bits": 8}))
    assert not peers.needs_dequantize(config("pack-quantized", False, {"num_bits": 8}))


EVERY = 8  # every 8th calibration sample: 20 of ref-vl's 160 (the quick rows take every 4th)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """llm-compressor's three recipes on ref-vl, in its own venv."""
    out = tmp_path_factory.mktemp("llmc")
    peers.run_recipes(NAME, RECIPES, out, quick=True, every=EVERY)
    return out


@pytest.fixture(scope="module")
def reference():
    fp, processor = registry.load(NAME)
    return fp, processor, comparison_inputs(processor, NAME, n=6)


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if ".layers." in n and "visual" not in n
            and isinstance(m, torch.nn.Linear)}


@pytest.mark.llmcompressor
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_checkpoint_stores_integer_decoder_linears_and_float_towers(checkpoints, recipe):
    path = peers.checkpoint(checkpoints, NAME, recipe)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    bits = 8 if recipe == "sq+gptq" else 4
    assert group["weights"]["num_bits"] == bits
    assert q["format"] == ("int-quantized" if bits == 8 else "pack-quantized")
    if bits == 8:  # W8A8: 8-bit dynamic per-token activations
        assert (group["input_activations"]["num_bits"], group["input_activations"]["strategy"]) == (8, "token")
    else:
        assert group["input_activations"] is None and group["weights"]["group_size"] == 128
    assert group["weights"]["symmetric"] == (recipe != "awq")
    layers = peers.quantized_layers(path)
    assert len(layers) == 4 * 7 and all(".layers." in name for name in layers)  # every decoder linear, nothing else
    for tensors in layers.values():
        assert tensors.get("weight", tensors.get("weight_packed"))[0] == ("I8" if bits == 8 else "I32")
    run = json.loads((path / "run.json").read_text())
    assert run["calib_samples"] == len(range(0, 160, EVERY)) and run["calib_seconds"] > 0
    assert run["narrow_ignored"] == []  # every decoder width is a multiple of 128
    assert peers.storage_bytes(path) == {"weight": expected_storage(recipe), "patches": 0}


def expected_storage(recipe: str) -> int:
    """Bytes of ref-vl's decoder linears at rest, counted from their shapes."""
    # (out, in) of q, k, v, o, gate, up, down in each of the 4 layers
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256), (768, 256), (768, 256), (256, 768)]
    params = 4 * sum(o * i for o, i in shapes)
    channels, groups = 4 * sum(o for o, _ in shapes), params // 128
    return {"sq+gptq": params + 4 * channels,                 # int8 codes, a float32 scale per channel
            "gptq": params // 2 + 4 * groups,                 # 4-bit codes, a float32 scale per group of 128
            "awq": params // 2 + 4 * groups + groups // 2}[recipe]  # + a 4-bit zero point per group


@pytest.mark.llmcompressor
@pytest.mark.parametrize("recipe", RECIPES)
def test_it_loads_through_transformers_quantized_on_its_grid(checkpoints, reference, recipe):
    fp, _, held_out = reference
    model, how = peers.load_checkpoint(peers.checkpoint(checkpoints, NAME, recipe))
    assert how.endswith("(dequantize=True)") == (recipe == "awq")
    with torch.no_grad():
        model(**{k: v for k, v in held_out[0].items() if k != "labels"})  # compressed-tensors decompresses here
    low, high = GRID[recipe]
    ours = decoder_linears(model)
    assert len(ours) == 28
    for name, lin in ours.items():
        w = lin.weight.detach().double()
        scale = lin.weight_scale.detach().double() if hasattr(lin, "weight_scale") else None
        if scale is None:  # loaded dequantized (AWQ): rebuild the codes from the stored tensors
            scale, zero = stored_scale(checkpoints, recipe, name)
            assert zero.abs().sum() > 0, name  # asymmetric indeed
        else:
            zero = torch.zeros_like(scale)
        codes = w.reshape(w.shape[0], scale.shape[1], -1) / scale[:, :, None] + zero[:, :, None]
        assert (codes - codes.round()).abs().max() < 1e-3, name
        assert low <= codes.round().min() and codes.round().max() <= high, name
        assert not torch.equal(lin.weight, fp.get_submodule(name).weight), name
    for name, p in fp.named_parameters():  # the towers and lm_head as they were
        if "visual" in name or name.startswith("lm_head"):
            assert torch.equal(p, model.get_parameter(name)), name
    scores = compare(fp, model, held_out)
    floor = 25 if recipe == "sq+gptq" else 12
    for modality, sqnr in scores["decoder_sqnr"].items():
        assert floor < sqnr < 80, (modality, sqnr)  # close to FP, but not FP
    assert 0 < scores["kl"]["all"] < 0.1


def stored_scale(checkpoints, recipe: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of one layer as stored (zero points unpacked from their int32 words)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    key = name.replace("model.language_model.", "model.")  # checkpoint key names
    with safe_open(peers.checkpoint(checkpoints, NAME, recipe) / "model.safetensors", "pt") as f:
        scale = f.get_tensor(f"{key}.weight_scale").double()
        packed = f.get_tensor(f"{key}.weight_zero_point")
    zero = unpack_from_int32(packed, 4, torch.Size(scale.shape), packed_dim=0).double()
    return scale, zero


@pytest.mark.llmcompressor
def test_rows_come_in_the_bench_format(checkpoints, tmp_path):
    saved = []
    rows = peers.peer_rows(NAME, quick=True, recipes=["sq+gptq"], workdir=checkpoints, reuse_checkpoints=True,
                           on_row=lambda r: saved.append(len(r)))
    assert saved == [1] and len(rows) == 1
    row = rows[0]
    assert {"model", "bits", "method", "quick", "item", "digit", "prose_ppl", "decoder_sqnr", "kl",
            "calib_seconds", "storage", "calib_samples"} <= set(row)
    assert (row["model"], row["bits"], row["method"], row["quick"]) == (NAME, "W8A8", "llmc:sq+gptq", True)
    assert row["storage"] == {"weight": expected_storage("sq+gptq"), "patches": 0}
    for task in ("item", "digit"):
        assert 0.5 < row[task]["accuracy"] <= 1 and row[task]["answer_nll"] > 0
    assert 10 < row["prose_ppl"] < 1000 and 0 < row["kl"] < 0.1 and set(row["decoder_sqnr"]) == {"text", "vision"}
    assert row["calib_samples"] == 20 and row["llmc"]["loaded_with"] == "from_pretrained"
    assert markdown(rows).count("| W8A8 | llmc:sq+gptq |") == 1  # the results page's table takes it
    # --resume reuses the row: an interpreter that fails would stop the run if a recipe ran again
    out, failing = tmp_path / "rows.json", tmp_path / "python"
    out.write_text(json.dumps(rows))
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    assert peers.main(["--out", str(out), "--model", NAME, "--recipe", "sq+gptq", "--quick", "--resume",
                       "--llmc-python", str(failing)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    with pytest.raises(RuntimeError, match="exit 3"):  # and without it, the recipes do run
        peers.main(["--out", str(out), "--model", NAME, "--recipe", "gptq", "--quick", "--llmc-python", str(failing)])


@pytest.mark.llmcompressor
def test_the_omni_thinker_is_calibrated_and_keeps_every_modality(tmp_path):
    """The Omni thinker's decoder really goes through llm-compressor's calibration (traced through the
    whole thinker it would not) and its audio tower stays in float."""
    name = "ref-omni"
    peers.run_recipes(name, ["gptq"], tmp_path, quick=True, every=16)
    path = peers.checkpoint(tmp_path, name, "gptq")
    run = json.loads((path / "run.json").read_text())
    assert run["calib_samples"] == 16
    assert len(peers.quantized_layers(path)) == 28
    model, _ = peers.load_checkpoint(path)
    fp, processor = registry.load(name)
    for n, p in fp.named_parameters():
        if n.startswith(("audio_tower.", "visual.", "lm_head.")):
            assert torch.equal(p, model.get_parameter(n)), n
    scores = compare(fp, model, comparison_inputs(processor, name, n=4))
    assert set(scores["decoder_sqnr"]) == {"text", "vision", "audio"}
    assert all(12 < v < 80 for v in scores["decoder_sqnr"].values()), scores["decoder_sqnr"]
