"""``masquant.save`` / ``masquant.load``: exact round trips, and refusals that lose nothing."""

import json

import pytest
import torch

import masquant
from masquant import QuantConfig, QuantLinear
from masquant.config import options_for
from masquant.modality import get_router

from conftest import omni_samples, vl_samples

CASES = [("vl", dict(method="rtn")), ("vl", dict(method="mas", w_bits=4, epochs=1)),
         ("omni", dict(method="masquant", w_bits=4, rank=4, epochs=1)),
         ("omni", dict(method="awq", w_bits=4, a_bits=16, w_group_size=32, w_symmetric=False, awq_grid=3))]


def _quantize(family, kwargs, vl_model, omni_model, fresh):
    model = fresh(vl_model if family == "vl" else omni_model)
    make = vl_samples if family == "vl" else omni_samples
    masquant.quantize(model, make(range(3)), QuantConfig(**kwargs), progress=False)
    return model, make([77])[0]


@pytest.mark.parametrize(("family", "kwargs"), CASES)
def test_round_trip_gives_identical_logits(family, kwargs, vl_model, omni_model, fresh, tmp_path):
    model, sample = _quantize(family, kwargs, vl_model, omni_model, fresh)
    masquant.save(model, tmp_path / "q")
    loaded = masquant.load(tmp_path / "q")
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert loaded.masquant_config == model.masquant_config
    assert get_router(loaded).carriers == get_router(model).carriers and get_router(model).carriers
    with torch.no_grad():
        assert torch.equal(model(**sample).logits, loaded(**sample).logits)
    out = loaded.generate(**sample, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(**sample, max_new_tokens=4, do_sample=False))
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.runtime == "int" for m in layers)
    if kwargs["method"] == "masquant":
        assert any(m.patches for m in layers)
    if kwargs["method"] == "mas":
        assert any(m.modality_qweights for m in layers)


def test_w4_codes_are_stored_packed(vl_model, fresh, tmp_path):
    model, _ = _quantize("vl", dict(method="rtn", w_bits=4), vl_model, None, fresh)
    masquant.save(model, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        codes = [k for k in f.keys() if k.endswith("qweight.codes")]  # noqa: SIM118 - safe_open is not iterable
        assert codes and all(f.get_tensor(k).dtype == torch.uint8 for k in codes)
        q_proj = next(k for k in codes if "layers.0.self_attn.q_proj" in k)
        assert f.get_tensor(q_proj).shape[1] == 64 // 2


@pytest.mark.reliability(
    case='save to a non-empty directory; load of an unfinished or foreign directory',
    expect="refused; the user's file is kept")
def test_refusals(vl_model, fresh, tmp_path):
    with pytest.raises(ValueError, match="not quantized by masquant"):
        masquant.save(fresh(vl_model), tmp_path / "fp")
    model, _ = _quantize("vl", dict(method="rtn"), vl_model, None, fresh)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        masquant.save(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match=r"quant_config\.json"):
        masquant.load(tmp_path / "busy")
    masquant.save(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    (tmp_path / "q" / "quant_config.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        masquant.load(tmp_path / "q")
    meta["linears"].popitem()  # a layout that does not match the tensors
    (tmp_path / "q" / "quant_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the saved layout"):
        masquant.load(tmp_path / "q")


@pytest.mark.reliability(
    case='a write fails while saving',
    expect='the error is raised and no directory is left behind')
def test_a_failing_save_leaves_nothing_behind(vl_model, fresh, tmp_path):
    model, _ = _quantize("vl", dict(method="rtn"), vl_model, None, fresh)

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        masquant.save(model, tmp_path / "q", processor=Broken())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.reliability(
    case='saved model truncated, modified, or missing a file',
    expect='IntegrityError naming the file')
def test_load_names_a_truncated_modified_or_missing_file(vl_model, fresh, tmp_path):
    model, sample = _quantize("vl", dict(method="masquant", w_bits=4, rank=4, epochs=1), vl_model, None, fresh)
    masquant.save(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert {"model.safetensors", "config.json"} <= set(meta["files"])
    weights = tmp_path / "q" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(masquant.IntegrityError, match=r"model\.safetensors has .* bytes.*truncated"):
        masquant.load(tmp_path / "q")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(flipped))
    with pytest.raises(masquant.IntegrityError, match=r"model\.safetensors does not match its saved SHA-256"):
        masquant.load(tmp_path / "q")
    weights.write_bytes(data)
    masquant.verify(tmp_path / "q")  # restored: loads again, same logits
    with torch.no_grad():
        assert torch.equal(masquant.load(tmp_path / "q")(**sample).logits, model(**sample).logits)
    (tmp_path / "q" / "config.json").unlink()
    with pytest.raises(masquant.IntegrityError, match=r"config\.json is missing"):
        masquant.load(tmp_path / "q")
    (tmp_path / "q" / "quant_config.json").write_text('{"format": "masq')
    with pytest.raises(masquant.IntegrityError, match="not valid JSON"):
        masquant.load(tmp_path / "q")


@pytest.mark.reliability(
    case='disk full while overwriting a saved model',
    expect='the previous model is intact and verifies')
def test_a_failing_overwrite_keeps_the_previous_model(vl_model, fresh, tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = _quantize("vl", dict(method="rtn"), vl_model, None, fresh)
    masquant.save(model, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}

    def full_disk(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # part of the file reaches the disk, then it is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    with pytest.raises(OSError, match="No space left"):
        masquant.save(model, tmp_path / "q", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no staging leftovers
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()} == before
    masquant.verify(tmp_path / "q")


@pytest.mark.reliability(
    case='two runs with the same inputs and seed',
    expect='bit-identical saved weights')
@pytest.mark.parametrize("method", ["masquant", "mbq"])
def test_same_inputs_and_seed_give_bit_identical_saved_weights(method, vl_model, fresh, tmp_path):
    digests = []
    for run in range(2):
        own = options_for(method, rank=4, epochs=1, lambdas="auto")
        model, _ = _quantize("vl", dict(method=method, w_bits=4, **own), vl_model, None, fresh)
        masquant.save(model, tmp_path / str(run))
        digests.append(json.loads((tmp_path / str(run) / "quant_config.json").read_text())["files"])
    assert digests[0]["model.safetensors"] == digests[1]["model.safetensors"]
