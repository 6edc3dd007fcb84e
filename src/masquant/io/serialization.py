"""Save and load quantized models. A saved model is a directory with

* ``model.safetensors``: every tensor; each quantized linear as integer ``codes`` (W4: two per
  byte), ``scale`` / ``zero`` per row or group, ``smooth`` (one row per modality), ``bias`` and,
  for MASQuant, ``patches.<modality>.l1/l2``;
* ``quant_config.json``: format and version, the ``QuantConfig``, the token-id -> modality table,
  each linear's layout and every other file's size and SHA-256; written last, so a directory
  without it is unfinished;
* the original ``config.json`` / ``generation_config.json``, and the processor files if given.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..config import QuantConfig
from ..modality import Modality, ModalityRouter, attach_router
from ..runtime.qlinear import QuantLinear, replace_module

log = logging.getLogger("masquant")

FORMAT = "masquant"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a streamed (sharded) model
QUANT_CONFIG = "quant_config.json"


def refuse_nonempty(directory: Path, overwrite: bool) -> None:
    """An existing non-empty output directory is never replaced unless asked."""
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; choose another directory or allow "
                              "overwriting (--overwrite / overwrite=True)")


@contextlib.contextmanager
def staged_directory(directory: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``directory`` that replaces it on success and is removed on failure,
    so a half-written output never appears; one left by a killed process is removed by the next save."""
    refuse_nonempty(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.masquant-staging"  # one fixed name: a killed run's is reused
    if tmp.exists():
        log.info("removing %s, left by an interrupted save", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if directory.exists():  # moved aside first: a kill between the renames leaves it intact beside
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            old.rmdir()
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_class(directory: Path):
    """``(class, config)`` of the Hugging Face architecture that ``directory/config.json`` names."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(directory)
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{directory}/config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not provide")
    return cls, hf_config


def save(model: nn.Module, directory: str | Path, processor=None, overwrite: bool = False,
         extra_files: dict[str, str] | None = None, reference: str | None = None) -> Path:
    """Write a quantized ``model`` (and ``processor``) to ``directory`` atomically; returns the path.
    ``extra_files`` (name -> text) are written alongside; ``reference`` names the reference model it
    came from (whose test slices evaluate it)."""
    from safetensors.torch import save_model

    from .omni import quantized_root, write_speakers

    directory = Path(directory)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers or not hasattr(quantized_root(model)[0], "masquant_config"):
        raise ValueError("this model is not quantized by masquant; run masquant.quantize(model, calib, config) first")
    with staged_directory(directory, overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_speakers(model, tmp)  # (a full Qwen2.5-Omni model's talker voices)
        write_metadata(tmp, model, {name: layer.layout() for name, layer in layers.items()}, processor,
                       extra_files, reference)
    log.info("saved %d quantized linears to %s", len(layers), directory)
    return directory


def write_metadata(directory: Path, model: nn.Module, layouts: dict[str, dict], processor=None,
                   extra_files: dict[str, str] | None = None, reference: str | None = None) -> None:
    """Everything of a saved model but its weights, ``quant_config.json`` (with the size and
    SHA-256 of every file already in ``directory``) last."""
    from ..version import __version__
    from .omni import quantized_root

    root, inside = quantized_root(model)  # (a full Qwen2.5-Omni model: its thinker)
    router = getattr(root, "_masquant_router", None)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "masquant_version": __version__,
            "quant_config": root.masquant_config.to_dict(),
            "router": {str(k): v.name.lower() for k, v in sorted((router.table if router else {}).items())},
            "carriers": {m.name.lower(): list(keys) for m, keys in (router.carriers if router else {}).items()},
            "linears": layouts}
    if reference is not None:
        meta["reference"] = reference
    if inside:
        meta["quantized_module"] = inside
    hf_config = copy.deepcopy(model.config)
    hf_config.architectures = [type(model).__name__]
    hf_config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    meta["files"] = {str(f.relative_to(directory)): _fingerprint(f)
                     for f in sorted(directory.rglob("*")) if f.is_file()}
    (directory / QUANT_CONFIG).write_text(json.dumps(meta, indent=1))  # written last: marks a complete model


class IntegrityError(ValueError):
    """A file of a saved model is missing, truncated or modified."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify(directory: str | Path) -> None:
    """Check every file that ``quant_config.json`` lists (size, then SHA-256)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if "files" not in meta:
        log.warning("%s was saved without checksums (older masquant); not verified", directory)
        return
    for name, expected in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (the saved model is incomplete)")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise IntegrityError(f"{path} has {size} bytes, {expected['bytes']} were saved "
                                 f"({'truncated' if size < expected['bytes'] else 'modified'}); re-save or re-copy it")
        if sha256_file(path) != expected["sha256"]:
            raise IntegrityError(f"{path} does not match its saved SHA-256 (modified or corrupted); "
                                 "re-save or re-copy it")


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / QUANT_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {QUANT_CONFIG}: not a model saved by masquant.save "
                                "(or an unfinished one)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path} is not valid JSON ({err}): truncated or modified") from err
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path} does not hold a JSON object: modified")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                         f"{FORMAT!r} version {FORMAT_VERSION}")
    return meta


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a saved model: ``model.safetensors``, or the shards its index names."""
    index = directory / WEIGHTS_INDEX
    if index.exists():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / WEIGHTS]


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """State-dict name -> the other names of the same tensor (tied weights: the file holds one
    of them, e.g. ``lm_head.weight`` for embeddings tied to the head)."""
    by_tensor: dict[int, set[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), set()).add(key)
    return {k: names - {k} for names in by_tensor.values() for k in names}


def _carriers(meta: dict, model: nn.Module) -> dict[Modality, tuple[str, ...]]:
    """The inputs that carry each modality's features: saved with the model, else (older files) its family's."""
    if "carriers" in meta:
        return {Modality[m.upper()]: tuple(keys) for m, keys in meta["carriers"].items()}
    from ..arch import UnsupportedArchitectureError, get_adapter

    try:
        return dict(get_adapter(model).feature_keys)
    except UnsupportedArchitectureError:  # a generic adapter's model: placeholders route by token
        return {}


def load(directory: str | Path, runtime: str | None = None, check: bool = True) -> nn.Module:
    """Rebuild a model written by ``save`` (in eval mode, integer runtime unless ``runtime``). ``check``
    first verifies every file's size and SHA-256 (``IntegrityError`` names a missing or modified one)."""
    from safetensors.torch import load_file

    from .omni import read_speakers

    directory = Path(directory)
    meta = read_meta(directory)
    if check:
        verify(directory)
    config = QuantConfig.from_dict(meta["quant_config"])
    if runtime is not None:
        config = QuantConfig.from_dict({**config.to_dict(), "runtime": runtime})
    cls, hf_config = model_class(directory)
    model = cls._from_config(hf_config)
    router = ModalityRouter({int(k): Modality[v.upper()] for k, v in meta["router"].items()}, _carriers(meta, model))
    for name, layout in meta["linears"].items():
        replace_module(model, name, QuantLinear.from_layout(layout, config, router))
    files = weight_files(directory)
    expected = set(model.state_dict())
    loaded, unexpected = set(), []
    for path in files:
        part = load_file(str(path))
        unexpected += [k for k in part if k not in expected]
        model.load_state_dict({k: v for k, v in part.items() if k in expected}, strict=False)
        loaded.update(part)
        del part
    aliases = _aliases(model)
    missing = sorted(k for k in expected - loaded if not aliases[k] & loaded)
    if missing or unexpected:
        raise ValueError(f"the weights in {directory} do not match the saved layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    read_speakers(model, directory)
    root = model.get_submodule(meta.get("quantized_module", ""))  # (a full Qwen2.5-Omni model: its thinker)
    attach_router(root, router)
    root.masquant_config = config
    return model.eval()
