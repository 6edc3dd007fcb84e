import contextlib
import copy
import dataclasses
import os

import pytest
import torch

import masquant
from masquant.refmodels import tiny


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


# cuBLAS reads this when it makes its first handle, so it is set before any test touches a GPU
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def deterministic():
    """Two GPU runs give the same bits only with PyTorch's deterministic algorithms: kernels that
    add with atomics (``index_add_``, the backward of indexing, some reductions) sum in a
    different order on every run (cuBLAS then needs the fixed workspace set above)."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _switches(monkeypatch):
    """masquant reads its environment switches once; each test starts and ends with the real ones.
    Integer GEMMs are forced (``MASQUANT_INT_GEMM=int``) unless asked otherwise, so that the same
    kernels run on every CPU; tests/test_dispatch.py covers the measured choice."""
    from masquant import switches

    monkeypatch.setenv("MASQUANT_INT_GEMM", os.environ.get("MASQUANT_INT_GEMM", "int"))
    switches.reload()
    yield
    switches.reload()


def set_switch(monkeypatch, name: str, value: str | None) -> None:
    """Set (or with None, remove) an environment switch and have masquant read it again."""
    from masquant import switches

    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    switches.reload()


TEXT_OUTLIERS = [3, 17, 42]
VISION_OUTLIERS = [8, 25, 51]


def first_q_proj_outputs(models, sample) -> list:
    """Each model's layer-0 ``q_proj`` output on ``sample`` (the same input in all: nothing quantized before it)."""
    outputs = []
    for m in models:
        q_proj = m.model.language_model.layers[0].self_attn.q_proj
        hook = q_proj.register_forward_hook(lambda mod, args, out: outputs.append(out[0]))
        with torch.no_grad():
            m(**sample)
        hook.remove()
    return outputs


def misaligned_vl(seed: int = 1):
    """Tiny Qwen2.5-VL whose text and vision tokens have outliers in different channels, and
    whose vision tokens are ~20x larger than text ones (planted for tests, not realism)."""
    model = tiny.tiny_qwen2_5_vl(seed=seed)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[:, TEXT_OUTLIERS] *= 40.0
        out = model.model.visual.merger.mlp[-1]
        out.weight *= 20.0
        out.bias *= 20.0
        out.weight[VISION_OUTLIERS] *= 10.0
        out.bias[VISION_OUTLIERS] *= 10.0
    return model


@contextlib.contextmanager
def interrupted_at(method: str, layer: int):
    """Within the block, ``method`` raises KeyboardInterrupt when it reaches decoder layer ``layer``
    (a run stopped by the user); the method is restored afterwards."""
    from masquant.methods import METHODS

    original = METHODS[method]

    def interrupted(ctx):
        if ctx.index == layer:
            raise KeyboardInterrupt
        return original.fit(ctx)

    METHODS[method] = dataclasses.replace(original, fit=interrupted)
    try:
        yield
    finally:
        METHODS[method] = original


needs_native = pytest.mark.skipif(masquant.runtime.native.library() is None, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module", params=["default", "MASQUANT_NO_VNNI", "MASQUANT_PORTABLE"])
def kernel_library(request):
    """The kernel as built for this CPU, and the lower instruction sets' code (AVX2 where the CPU
    has it, plain C++ loops), each built into a separate cached library."""
    from masquant.runtime import native

    if request.param == "default" or native.library() is None:
        return native.library()
    lib = native.load(native.find_compiler(), (request.param,))
    assert lib.isa == (0 if request.param == "MASQUANT_PORTABLE" else min(native.library().isa, 1))
    return lib
