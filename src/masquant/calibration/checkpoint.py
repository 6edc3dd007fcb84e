"""Resumable calibration: each finished decoder layer is written to a state directory, so a killed
run continues from the last finished layer and ends with the same bytes.

Per layer ``i``: ``layer_000i.safetensors`` (its ``QuantLinear`` state dicts) and ``layer_000i.json``
(layouts, report, RNG state, tensor SHA-256s), plus ``hidden_000i.safetensors`` (outputs = next inputs)
for the last finished layer only. Writes are atomic (temp file, fsync, rename) and the JSON comes last,
so a layer is finished only when complete. ``run.json`` records the run; resuming anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..io.serialization import sha256_file
from ..modality import Modality, ModalityRouter
from ..runtime.qlinear import QuantLinear, replace_module
from .report import LayerReport

STATE_DIR = ".masquant-partial"
RUN = "run.json"
RATIOS = "gradient_ratios.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hash_tensor(digest, name: str, value: torch.Tensor) -> None:
    digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
    digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def layer_digest(layer: nn.Module) -> str:
    """SHA-256 of a full-precision decoder layer's tensors (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, value in sorted(layer.state_dict().items()):
        _hash_tensor(digest, name, value)
    return digest.hexdigest()


def fingerprint(model: nn.Module, inputs: list[dict], config: QuantConfig) -> dict:
    """What a run calibrates: settings, a hash of every calibration tensor, a hash of the model's config and
    input embeddings (to tell checkpoints apart), and the device type (results differ across devices)."""
    data = hashlib.sha256()
    for sample in inputs:
        for key in sorted(sample):
            value = sample[key]
            if torch.is_tensor(value):
                _hash_tensor(data, key, value)
    embeddings = model.get_input_embeddings().weight
    weights = hashlib.sha256(model.config.to_json_string().encode())
    _hash_tensor(weights, "embeddings", embeddings)
    return {"config": config.to_dict(), "samples": len(inputs), "inputs_sha256": data.hexdigest(),
            "model_sha256": weights.hexdigest(), "device": embeddings.device.type}


class LayerCheckpoint:
    """The state directory of one calibration run."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _layer(self, index: int, suffix: str) -> Path:
        return self.dir / f"layer_{index:04d}.{suffix}"

    def start(self, run: dict, resume: bool) -> int:
        """Open the state for ``run`` (a ``fingerprint``); returns how many layers are finished."""
        path = self.dir / RUN
        if path.exists():
            if not resume:
                raise FileExistsError(f"{self.dir} holds the state of an earlier calibration ({self.finished()} "
                                      "layers finished); resume it (--resume / resume=True) or start over "
                                      "(--overwrite / delete the directory)")
            saved = json.loads(path.read_text())
            saved.setdefault("device", run.get("device"))  # state written before the device was recorded
            diff = sorted(k for k in run if saved.get(k) != run[k])
            if "device" in diff:
                raise ValueError(f"cannot resume {self.dir}: the run was started on {saved['device']} and this one "
                                 f"computes on {run['device']}; resume it on {saved['device']} (--device), or start "
                                 "over (--overwrite)")
            if diff:
                raise ValueError(f"cannot resume {self.dir}: the run was started with other {', '.join(diff)}; "
                                 "use the same model, calibration set and settings, or start over (--overwrite)")
            return self.finished()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / RATIOS).unlink(missing_ok=True)  # a new run measures its own
        _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(run, indent=1)))
        return 0

    def finished(self) -> int:
        """Layers 0..n-1 complete: their tensors present and matching their recorded checksums,
        and the outputs of layer n-1 (the inputs to continue from) likewise."""
        n, damaged = 0, None
        while self._layer(n, "json").exists():
            tensors = self._layer(n, "safetensors")
            if not tensors.exists() or sha256_file(tensors) != self._meta(n)["sha256"][tensors.name]:
                damaged = tensors
                break
            n += 1
        if n:
            hidden = self._hidden(n - 1)
            if not hidden.exists() or sha256_file(hidden) != self._meta(n - 1)["sha256"][hidden.name]:
                what = f"{damaged} is damaged and {hidden.name}" if damaged else str(hidden)
                raise ValueError(f"{what} is missing or damaged: this state cannot be resumed; start over "
                                 "(--overwrite, or delete the state directory)")
        return n

    def save_ratios(self, ratios: list[dict[Modality, float]]) -> None:
        """The gradient ratios of this run (MBQ, ``lambdas="auto"``), so that a resumed run reuses
        them instead of measuring them again (JSON keeps every float exactly)."""
        data = [{m.name.lower(): v for m, v in layer.items()} for layer in ratios]
        _atomic_write(self.dir / RATIOS, lambda tmp: tmp.write_text(json.dumps(data)))

    def ratios(self) -> list[dict[Modality, float]] | None:
        """The saved gradient ratios, or None when none were saved."""
        path = self.dir / RATIOS
        if not path.exists():
            return None
        return [{Modality[name.upper()]: v for name, v in layer.items()} for layer in json.loads(path.read_text())]

    def _meta(self, index: int) -> dict:
        return json.loads(self._layer(index, "json").read_text())

    def _hidden(self, index: int) -> Path:
        return self.dir / f"hidden_{index:04d}.safetensors"

    def save_layer(self, index: int, layer: nn.Module, paths: list[str], report: LayerReport,
                   hidden: list[torch.Tensor], fp_digest: str) -> None:
        from safetensors.torch import save_file

        tensors = {f"{path}.{key}": value.detach().cpu().contiguous()
                   for path in paths for key, value in layer.get_submodule(path).state_dict().items()}
        _atomic_write(self._layer(index, "safetensors"), lambda tmp: save_file(tensors, str(tmp)))
        _atomic_write(self._hidden(index), lambda tmp: save_file(
            {f"hidden.{j}": h.detach().cpu().contiguous() for j, h in enumerate(hidden)}, str(tmp)))
        meta = {"index": index, "fp_sha256": fp_digest, "layouts": {p: layer.get_submodule(p).layout() for p in paths},
                "report": report.to_dict(), "rng": torch.get_rng_state().tolist(),
                "sha256": {p.name: sha256_file(p) for p in (self._layer(index, "safetensors"), self._hidden(index))}}
        _atomic_write(self._layer(index, "json"), lambda tmp: tmp.write_text(json.dumps(meta)))
        for old in range(index):  # only the last finished layer's outputs are needed to resume
            self._hidden(old).unlink(missing_ok=True)

    def restore_layer(self, index: int, layer: nn.Module, config: QuantConfig, router: ModalityRouter) -> LayerReport:
        """Swap the saved quantized linears into ``layer``; returns its report."""
        from safetensors.torch import load_file

        meta = self._meta(index)
        if meta.get("fp_sha256") != layer_digest(layer):
            raise ValueError(f"cannot resume {self.dir}: decoder layer {index} of this model differs from the one the "
                             "interrupted run calibrated (other weights); use the same model, or start over "
                             "(--overwrite)")
        tensors = load_file(str(self._layer(index, "safetensors")))
        for path, layout in meta["layouts"].items():
            device = layer.get_submodule(path).weight.device
            qlinear = QuantLinear.from_layout(layout, config, router)
            qlinear.load_state_dict({k.removeprefix(f"{path}."): v for k, v in tensors.items()
                                     if k.startswith(f"{path}.")})
            replace_module(layer, path, qlinear.to(device))
        torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
        return LayerReport.from_dict(meta["report"])

    def hidden(self, index: int, device: torch.device) -> Iterator[torch.Tensor]:
        """The saved outputs of layer ``index`` (the inputs of layer ``index + 1``), one at a time
        (with offload, each goes to its store before the next is read)."""
        from safetensors import safe_open

        with safe_open(str(self._hidden(index)), framework="pt", device="cpu") as f:
            for j in range(len(f.keys())):
                yield f.get_tensor(f"hidden.{j}").to(device)
