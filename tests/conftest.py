import copy

import pytest
import torch

from masquant import tiny


@pytest.fixture(scope="session")
def vl_model():
    return tiny.tiny_qwen2_5_vl()


@pytest.fixture(scope="session")
def omni_model():
    return tiny.tiny_qwen2_5_omni_thinker()


@pytest.fixture
def fresh(request):
    """A deep copy of a session model, so tests may quantize it in place."""
    return lambda model: copy.deepcopy(model)


def vl_samples(seeds, **kw):
    return [tiny.tiny_sample(s, family="vl", **kw) for s in seeds]


def omni_samples(seeds, **kw):
    return [tiny.tiny_sample(s, family="omni", image=True, audio=True, **kw) for s in seeds]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
