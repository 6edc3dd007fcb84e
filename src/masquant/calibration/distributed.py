"""Data-parallel calibration with ``torch.distributed`` (one process per GPU, or several on CPU).

Under ``torchrun --nproc-per-node N``, every rank validates the whole calibration set and keeps the
batches ``i`` with ``i % N == rank``; everything derived from samples is then summed (or maxed) over
the ranks, so every rank ends with the same model, equal to a single-process run up to float sum order.
Without a group (or with one process) every helper returns its input unchanged. Tensors may be on any
device (NCCL copies go to the rank's GPU and back).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..modality import NUM_MODALITIES, Modality
from .stats import ChannelStats, SiteStats

_OPS = {"sum": "SUM", "max": "MAX"}


def active() -> bool:
    """Whether calibration is data-parallel: a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(backend: str | None = None) -> bool:
    """Join the ``torchrun`` process group from the environment (NCCL on GPU ``LOCAL_RANK`` with CUDA, else
    Gloo); True when this call created it. No-op when ``WORLD_SIZE`` is absent or 1, or a group exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for data-parallel calibration, but this "
                           "PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown(completed: bool = True) -> None:
    """Leave the process group. After a ``completed`` command the ranks first meet at a barrier, so none
    tears down connections another still uses; after an error they leave at once (a rank may be stuck)."""
    if dist.is_available() and dist.is_initialized():
        if completed and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank computes and communicates: its GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(n: int) -> list[int]:
    """The global indices (of ``n`` items) this rank holds: ``i % world_size == rank``."""
    return list(range(rank(), n, world_size()))


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over the ranks (``op``: ``"sum"`` or ``"max"``), on its own device.
    In place when it already lies on the communication device: use the returned tensor."""
    if not active():
        return tensor
    buf = tensor.to(device())
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    return buf.to(tensor.device)


def all_reduce_floats(values: Sequence[float], op: str = "sum") -> list[float]:
    """Python numbers reduced over the ranks as float64."""
    if not active():
        return list(values)
    return all_reduce(torch.tensor(list(values), dtype=torch.float64), op).tolist()


def all_reduce_ints(values: Sequence[int], op: str = "sum") -> list[int]:
    """Python ints reduced over the ranks as int64."""
    if not active():
        return list(values)
    return all_reduce(torch.tensor(list(values), dtype=torch.int64), op).tolist()


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the ranks, in place. A rank without a gradient contributes
    zeros; a parameter no rank has a gradient for keeps ``grad=None`` (skipped, as in one process)."""
    if not active():
        return
    held = all_reduce_ints([p.grad is not None for p in params], "max")
    for p, any_rank in zip(params, held, strict=True):
        if not any_rank:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(all_reduce(p.grad))


def all_reduce_sites(sites: dict[str, SiteStats], fallback: torch.device | None = None) -> None:
    """Merge per-rank input statistics in place over the union of modalities any rank saw: MAX of abs-max,
    SUM of abs-sum, count and second moments, in ``Modality`` order. ``fallback``: device for statistics a
    rank creates for a site where it saw no token."""
    if not active():
        return
    names = sorted(sites)
    flags = torch.zeros(len(names), NUM_MODALITIES, 3, dtype=torch.int64)  # present, has X^T X, features
    counts = torch.zeros(len(names), NUM_MODALITIES, dtype=torch.int64)
    for i, name in enumerate(names):
        for m, s in sites[name].per_modality.items():
            flags[i, int(m)] = torch.tensor([1, s.second is not None, s.absmax.numel()])
            counts[i, int(m)] = s.count
    flags, counts = all_reduce(flags, "max").tolist(), all_reduce(counts).tolist()
    for i, name in enumerate(names):
        site = sites[name]
        local = next((s.absmax.device for s in site.per_modality.values()), fallback or torch.device("cpu"))
        merged = {}
        for m in Modality:
            present, second, features = flags[i][int(m)]
            if not present:
                continue
            stats = site.per_modality.get(m) or ChannelStats.empty(features, bool(second), local)
            stats.absmax = all_reduce(stats.absmax, "max")
            stats.abssum = all_reduce(stats.abssum)
            if second:
                if stats.second is None:
                    stats.second = torch.zeros(features, features, dtype=torch.float64, device=local)
                stats.second = all_reduce(stats.second)
            stats.count = counts[i][int(m)]
            merged[m] = stats
        site.per_modality = merged


def all_reduce_meters(meters: Sequence) -> None:
    """Sum the signal and noise powers of ``report.SqnrMeter``s over the ranks, in place
    (a modality measured on any rank is measured)."""
    if not active():
        return
    packed = torch.zeros(len(meters), NUM_MODALITIES, 3, dtype=torch.float64)  # present, signal, noise
    for i, meter in enumerate(meters):
        for m in meter.signal:
            packed[i, int(m)] = torch.tensor([1.0, meter.signal[m], meter.noise[m]], dtype=torch.float64)
    packed = all_reduce(packed).tolist()
    for i, meter in enumerate(meters):
        present = [m for m in Modality if packed[i][int(m)][0] > 0]
        meter.signal = {m: packed[i][int(m)][1] for m in present}
        meter.noise = {m: packed[i][int(m)][2] for m in present}


def on_rank0(fn: Callable, *args, **kwargs):
    """Run ``fn`` on rank 0 only (e.g. something that changes files) and return its result on
    every rank; an exception it raises is raised on every rank."""
    if not active():
        return fn(*args, **kwargs)
    payload = [None]
    if rank() == 0:
        try:
            payload = [(True, fn(*args, **kwargs))]
        except Exception as err:  # re-raised on every rank below
            try:
                pickle.dumps(err)
            except Exception:  # an exception that cannot travel: its message does
                err = RuntimeError(str(err))
            payload = [(False, err)]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if not ok:
        raise value
    return value
