"""One process of the data-parallel tests: ``tests/test_distributed.py`` starts two of these with
the environment variables ``torchrun`` sets (Gloo on CPU) and compares what they write with a
single-process run on the same samples."""

from __future__ import annotations

import copy
import sys

import torch

torch.set_num_threads(1)

import masquant  # noqa: E402
from masquant.calibration import distributed  # noqa: E402
from masquant.calibration.report import SqnrMeter  # noqa: E402
from masquant.calibration.stats import ChannelStats, SiteStats  # noqa: E402
from masquant.modality import Modality  # noqa: E402
from masquant.refmodels import tiny  # noqa: E402

# (method, settings): MASQuant with gradient-ratio lambdas, one MAS step per two samples (7 samples:
# the last step holds a sample of rank 0 only); MBQ on right-padded batches of 2 (4 batches: rank 0
# holds two, rank 1 two). MAS at its default lr=5e-2 is chaotic on these tiny random layers: the
# float summation order of one step's gradient alone (one process, one backward per sample instead
# of one for the step) moves the layer SQNR by up to ~0.4 dB; at lr=5e-3 it moves it by ~1e-6 dB,
# which lets the test compare the processes tightly.
RUNS = {
    "masquant": dict(method="masquant", w_bits=4, a_bits=8, epochs=1, mas_batch=2, calib_batch=1, lambdas="auto",
                     rank=4, lr=5e-3),
    "mbq": dict(method="mbq", w_bits=4, a_bits=8, calib_batch=2, awq_grid=6),
}


def model():
    return tiny.tiny_qwen2_5_vl(hidden=64, layers=2, seed=3)


def calibration() -> list[dict]:
    """Images on even samples only: with two ranks, rank 1 sees no vision token at all."""
    return [tiny.tiny_sample(s, family="vl", image=s % 2 == 0, text_len=8 + s) for s in range(7)]


def held_out() -> dict:
    return tiny.tiny_sample(100, family="vl", image=True)


def quantize_all() -> dict:
    out = {}
    for name, settings in RUNS.items():
        qmodel = copy.deepcopy(model())
        report = masquant.quantize(qmodel, calibration(), masquant.QuantConfig(**settings), progress=False)
        with torch.no_grad():
            logits = qmodel(**held_out()).logits
        out[name] = {"state": {k: v.clone() for k, v in qmodel.state_dict().items()}, "report": report.to_dict(),
                     "logits": logits}
    return out


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def helpers() -> dict:
    """The reduce helpers on per-rank data: rank 0 holds audio statistics (with X^T X), rank 1 none."""
    r = distributed.rank()
    gen = torch.Generator().manual_seed(r)
    site = SiteStats()
    text = ChannelStats.empty(4, False, torch.device("cpu"))
    text.update(torch.randn(3 + r, 4, generator=gen))
    site.per_modality[Modality.TEXT] = text
    if r == 0:
        audio = ChannelStats.empty(4, True, torch.device("cpu"))
        audio.update(torch.randn(5, 4, generator=gen))
        site.per_modality[Modality.AUDIO] = audio
    sites = {"x": site}
    distributed.all_reduce_sites(sites)
    meter = SqnrMeter()
    if r == 1:
        meter.signal, meter.noise = {Modality.VISION: 4.0}, {Modality.VISION: 1.0}
    meter.signal[Modality.TEXT], meter.noise[Modality.TEXT] = 1.0 + r, 0.5
    distributed.all_reduce_meters([meter])
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((3,), float(r + 1)) if r == 1 else None  # rank 0 held no sample
    distributed.all_reduce_grads([p, q])
    return {
        "stats": {m.name.lower(): {"absmax": s.absmax, "abssum": s.abssum, "count": s.count, "second": s.second}
                  for m, s in sites["x"].per_modality.items()},
        "meter": meter.result(), "grad_p": p.grad, "grad_q": q.grad,
        "ints": distributed.all_reduce_ints([r, 1]), "max": distributed.all_reduce_floats([r + 0.5], "max"),
        "on_rank0": distributed.on_rank0(lambda: f"from rank {distributed.rank()}"),
        "on_rank0_error": _error(lambda: distributed.on_rank0(_fail_on_rank0)),
    }


def _fail_on_rank0():
    raise ValueError(f"refused by rank {distributed.rank()}")


def errors() -> dict:
    config = masquant.QuantConfig(method="rtn", calib_batch=1)
    bad = calibration()[:2]
    bad[1] = {"attention_mask": bad[1]["attention_mask"]}
    return {
        "too_few": _error(lambda: masquant.quantize(model(), calibration()[:1], config, progress=False)),
        "checkpoint": _error(lambda: masquant.quantize(model(), calibration(), config, progress=False,
                                                       checkpoint="unused-state")),
        "invalid": _error(lambda: masquant.quantize(model(), bad, config, progress=False)),
    }


def main(out: str) -> None:
    assert distributed.init_from_env(backend="gloo")
    try:
        result = {"rank": distributed.rank(), "world": distributed.world_size(), "helpers": helpers(),
                  "errors": errors(), "runs": quantize_all()}
        torch.save(result, f"{out}/rank{distributed.rank()}.pt")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
