"""Where the calibration activations wait between uses (``quantize(..., offload=...)``).

Calibration keeps, per calibration batch, the current decoder layer's input and its
full-precision output (the target). ``ActivationStore.put`` turns such a tensor into its
stored form; whoever uses it moves it to the compute device (``tensor.to(device)``) only
for the sample being run, so at most one sample's activations are on the device at a time.

* ``None``: nothing moves (the tensors stay where they were computed);
* ``"cpu"``: host memory (with a GPU compute device; on a CPU run this is the same as ``None``);
* a directory: each tensor is written to its own file in a fresh sub-directory and read back
  memory-mapped, so the OS pages it in and out as needed; a tensor's file is removed when the
  tensor under the same key is replaced, and the sub-directory when the store is closed
  (also on errors). Moving bits through a file or between devices does not change them:
  results are bit-identical with and without offload.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path

import torch


def offload_directory(offload: str | Path | None) -> Path | None:
    """The directory ``offload`` names (``None`` for no offload or ``"cpu"``), created if missing;
    a clear error when it cannot be created or written to."""
    if offload is None or str(offload) == "cpu":
        return None
    directory = Path(offload)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"offload directory {directory} cannot be created ({e.strerror or e}); "
                         "pass a writable directory, or offload='cpu'") from e
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"offload directory {directory} is not a writable directory; "
                         "pass a writable directory, or offload='cpu'")
    return directory


class ActivationStore:
    """Stores activations by key (e.g. ``("hidden", sample)``); see the module docstring."""

    def __init__(self, offload: str | Path | None = None):
        self.host = offload is not None  # stored tensors are on the CPU (in RAM or in files)
        parent = offload_directory(offload)
        self.dir: Path | None = None
        if parent is not None:
            try:
                self.dir = Path(tempfile.mkdtemp(prefix="masquant-activations-", dir=parent))
            except OSError as e:
                raise ValueError(f"offload directory {parent} is not writable ({e.strerror or e}); "
                                 "pass a writable directory, or offload='cpu'") from e
        self._files: dict[Hashable, Path] = {}
        self._written = 0

    def put(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """The stored form of ``tensor`` (the tensor itself without offload)."""
        if not self.host:
            return tensor
        if self.dir is None:
            return tensor.detach().to("cpu")
        path = self.dir / f"{self._written:06d}.pt"
        self._written += 1
        torch.save(tensor.detach().to("cpu", copy=True), path)  # copy: only this tensor's elements
        stored = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        old = self._files.pop(key, None)
        if old is not None:  # a tensor still mapped from it stays readable (the file goes with it)
            old.unlink(missing_ok=True)
        self._files[key] = path
        return stored

    def file_bytes(self) -> int:
        """Bytes of the activation files now on disk."""
        return sum(p.stat().st_size for p in self._files.values())

    def close(self) -> None:
        """Remove the activation files (the tensors mapped from them stay readable where unlinking
        a mapped file is allowed, as on Linux and macOS)."""
        self._files.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
