"""The ``masquant quantize`` command and what the other commands share with it: the compute
device (``--device``, or the process's GPU under torchrun), the process-group backend, the
output directory and its calibration state (``--out``, ``--resume``, ``--overwrite``),
deterministic algorithms (``--deterministic``) and the calibration inputs (``--calib`` or a
reference model's own)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("masquant")


def run_quantize(args: argparse.Namespace) -> None:
    """Under ``torchrun`` (a process group, see ``masquant.calibration.distributed``) every process calibrates
    on its share of the samples; rank 0 alone touches OUT, saves and prints."""
    from ..calibration import distributed
    from ..calibration.offload import offload_directory
    from ..calibration.quantize import quantize
    from ..io import omni
    from ..io.loading import load_any
    from ..io.serialization import save
    from .options import quant_config

    world = distributed.world_size()
    check_architecture(args.model)  # the first thing a user needs to know
    full = omni.is_full_dir(Path(args.model))  # a full Qwen2.5-Omni checkpoint: its thinker is quantized
    talker = getattr(args, "talker", None)
    omni.check_choice(talker, args.model, full)
    device = compute_device(args)  # a bad --device is refused before the (slow) load
    offload_directory(args.offload)  # and so is an offload directory that cannot be written to
    if world > 1 and args.resume:
        raise ValueError(f"--resume is not available with data-parallel calibration ({world} processes): such a "
                         "run keeps no per-layer state; calibrate in one process to make a run resumable")
    config = quant_config(args)
    # before the (slow) load
    if args.resume and not args.overwrite and distributed.on_rank0(finished_output, args.out, config, args.model):
        if distributed.rank() == 0:
            print(f"{args.out} is already complete (every file's size and SHA-256 verified); nothing to do")
        return
    state, replace = distributed.on_rank0(prepare_output, args.out, args.overwrite, args.resume)
    if args.stream:
        report = _run_streaming(args, config, state if world == 1 else None, replace, device)
        if distributed.rank() != 0:
            return
    else:
        keep = full and talker != "drop"
        model, processor, reference = load_any(args.model, talker=True) if keep else load_any(args.model)
        if full:
            log.info("%s is a full Qwen2.5-Omni model: its thinker is quantized, %s", args.model,
                     "the talker and token2wav kept as they are (--talker drop leaves them out)" if keep
                     else "the talker and token2wav left out (--talker drop)")
        if device.type != "cpu":
            model.to(device)
        calib = calibration(args, processor, reference)
        report = quantize(omni.thinker_of(model), calib, config, progress=not args.no_progress,
                          checkpoint=state if world == 1 else None, resume=args.resume, offload=args.offload)
        if distributed.rank() != 0:
            return
        save(model, args.out, processor, overwrite=replace, extra_files={"report.json": report.to_json()},
             reference=reference)  # replaces OUT, calibration state included, only once the model is complete
    print(report.summary())
    print(f"saved to {args.out}")


def _run_streaming(args: argparse.Namespace, config, state: Path, replace: bool, device):
    import torch

    from ..calibration.streaming import quantize_streaming
    from ..io.hf import processor_of
    from ..io.loading import full_precision_dir

    path, reference = full_precision_dir(args.model)
    processor = processor_of(path)
    calib = calibration(args, processor, reference)
    dtype = torch.float32 if reference is not None else None  # the reference models run in float32
    return quantize_streaming(path, calib, config, args.out, processor, progress=not args.no_progress,
                              overwrite=replace, checkpoint=state, resume=args.resume, reference=reference, dtype=dtype,
                              device=device, offload=args.offload)


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """``--deterministic``: GPU kernels that add with atomics sum in another order on every run
    unless PyTorch is asked for deterministic algorithms; cuBLAS then needs a fixed workspace,
    which it reads when it makes its first handle (so before the model reaches the GPU)."""
    if not on:
        yield
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def process_backend(device: str | None) -> str | None:
    """The process-group backend ``--device`` asks for under torchrun: Gloo for ``cpu`` (also
    on a machine with GPUs), else the default (NCCL when CUDA is available)."""
    import torch

    try:
        return "gloo" if device is not None and torch.device(device).type == "cpu" else None
    except RuntimeError:  # a malformed --device is refused by compute_device, with its own message
        return None


def compute_device(args: argparse.Namespace):
    """``--device``, except under NCCL where each process computes on its own GPU (LOCAL_RANK)."""
    import torch

    from ..calibration import distributed

    if distributed.device().type == "cuda":
        own = distributed.device()
        if args.device is not None and torch.device(args.device) not in (torch.device("cuda"), own):
            log.warning("--device %s ignored: under torchrun with GPUs each process calibrates on its own GPU "
                        "(LOCAL_RANK: %s here)", args.device, own)
        return own
    device = torch.device(args.device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA GPU (or PyTorch was built without CUDA); "
                         "use --device cpu")
    return device


def check_architecture(spec: str) -> None:
    """A local checkpoint of a family masquant does not support is named (with the supported
    ones) before anything else is checked or loaded."""
    import json

    from ..arch import check_model_type

    config = Path(spec) / "config.json"
    if not config.is_file():
        return  # a reference model's name, or a directory that load_any will describe
    data = json.loads(config.read_text())
    check_model_type(data.get("model_type"), (data.get("architectures") or ["this model"])[0])


def finished_output(out: Path, config, model: str) -> bool:
    """Whether ``out`` holds the finished model this command makes (``--resume`` of a run that
    completed, e.g. retried by a scheduler): its checksums must hold and its settings match."""
    from ..config import QuantConfig
    from ..io.serialization import QUANT_CONFIG, IntegrityError, read_meta, verify

    if not (out / QUANT_CONFIG).is_file():
        return False
    try:
        verify(out)
    except IntegrityError as err:
        raise ValueError(f"{out} holds a finished model that fails its checks ({err}); --overwrite makes it "
                         "again") from None
    meta = read_meta(out)
    saved = QuantConfig.from_dict(meta["quant_config"]).to_dict()
    wanted = config.to_dict()
    differ = [f"{k} {saved.get(k)!r} there, {wanted.get(k)!r} asked" for k in sorted(set(saved) | set(wanted))
              if saved.get(k) != wanted.get(k)]
    if meta.get("reference") not in (None, model):
        differ.append(f"model {meta['reference']!r} there, {model!r} asked")
    if differ:
        raise FileExistsError(f"{out} holds a finished model made with other settings ({'; '.join(differ)}); "
                              "--overwrite replaces it, or choose another --out")
    return True


def prepare_output(out: Path, overwrite: bool, resume: bool) -> tuple[Path, bool]:
    """Where ``quantize --out`` keeps its calibration state, and whether saving may replace
    ``out`` (then holding only that state). Never touches files of the user's: a directory
    holding anything but masquant's state is refused unless ``--overwrite``; an unfinished run
    is continued with ``--resume`` or discarded with ``--overwrite``, and refused otherwise."""
    import shutil

    from ..calibration.checkpoint import STATE_DIR
    from ..io.serialization import refuse_nonempty

    state = out / STATE_DIR
    contents = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if contents == {STATE_DIR}:
        if resume:
            return state, True
        if overwrite:
            shutil.rmtree(state)
            return state, True
        raise FileExistsError(f"{out} holds an unfinished calibration: continue it with --resume, or start over "
                              "with --overwrite")
    if STATE_DIR in contents and not overwrite:
        raise FileExistsError(f"{out} holds an unfinished calibration next to other files: --resume --overwrite "
                              "continues it, --overwrite starts over (either replaces those files once the model "
                              "is saved)")
    refuse_nonempty(out, overwrite)  # empty, absent, or the user asked to replace it
    if state.exists() and not resume:
        shutil.rmtree(state)  # --overwrite: the old run's state goes with the rest
    elif resume and not state.exists():
        log.warning("--resume: %s holds no unfinished calibration; starting from the first layer", out)
    return state, True


def calibration(args: argparse.Namespace, processor, reference: str | None) -> list[dict]:
    """The samples ``--calib`` names, or the reference model's own calibration slice."""
    from ..io.calibfile import read_calibration
    from .options import data_options

    if args.calib is not None and processor is None:
        raise ValueError(f"{args.model} has no processor files; masquant needs the model's processor to read --calib")
    if args.calib is not None:
        return read_calibration(args.calib, processor, **data_options(args))
    if reference is not None:
        from ..refmodels.evaluate import calibration_inputs

        return calibration_inputs(processor, reference)
    raise ValueError("--calib (a JSONL file or a dataset) is required for models other than the reference models")
