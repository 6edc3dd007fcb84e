"""Models saved by masquant 0.1.0 (``tests/fixtures/saved-0.1.0``, written before the package
was reorganised) still load, with the settings they were made with, and give the same logits."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import masquant
from masquant import Modality, QuantLinear
from masquant.modality import get_router
from masquant.refmodels import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "saved-0.1.0"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_fixtures_are_there():
    assert NAMES == ["omni-awq-w4a16-asym-g32", "omni-masquant-w4a8", "vl-mas-w4a8"]


@pytest.mark.parametrize("name", NAMES)
def test_a_model_saved_by_0_1_0_loads_and_gives_its_logits(name):
    model = masquant.load(FIXTURES / name)
    family = name.split("-")[0]
    extra = dict(image=True, audio=True) if family == "omni" else {}
    sample = tiny.tiny_sample(77, family=family, **extra)
    expected = load_file(str(FIXTURES / f"{name}.logits.safetensors"))["logits"]
    with torch.no_grad():
        logits = model(**sample).logits
    # integer products are exact; only float summation order may differ between CPUs
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    method = model.masquant_config.method
    # files of 0.1.0 name no feature inputs: the model family's are used (routing by what a forward carries)
    assert "pixel_values" in get_router(model).carriers[Modality.VISION]
    assert layers and name.split("-")[1] == method
    if method == "masquant":
        assert any(m.patches for m in layers)
    if method == "mas":
        assert any(m.modality_qweights for m in layers)
