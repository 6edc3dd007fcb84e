"""Where the calibration activations (each batch's decoder-layer input and full-precision target)
wait between uses (``quantize(..., offload=...)``); users move one sample at a time to the device.

* ``None``: nothing moves; ``"cpu"``: host memory (same as ``None`` on a CPU run);
* a directory: one file per tensor, read back memory-mapped and unlinked right after mapping where
  the OS allows (a killed run leaves at most one file); elsewhere files go on replace or ``close``.

Results are bit-identical with and without offload.
"""

from __future__ import annotations

import os
import tempfile
import weakref
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
        self.dir = offload_directory(offload)
        self._files: dict[Hashable, Path] = {}  # files still linked (where unlinking a mapped file fails)
        self._bytes: dict[Hashable, int] = {}
        self._held: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> the tensor put there

    def put(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """The stored form of ``tensor`` (the tensor itself without offload, or when this store
        already holds it under ``key``)."""
        if not self.host or self._held.get(key) is tensor:
            return tensor
        if self.dir is None:
            stored = tensor.detach().to("cpu")
            self._held[key] = stored
            return stored
        try:
            handle, name = tempfile.mkstemp(prefix="masquant-activations-", suffix=".pt", dir=self.dir)
        except OSError as e:
            raise ValueError(f"offload directory {self.dir} is not writable ({e.strerror or e}); "
                             "pass a writable directory, or offload='cpu'") from e
        path = Path(name)
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(tensor.detach().to("cpu", copy=True), f)  # copy: only this tensor's elements
            stored = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        old = self._files.pop(key, None)
        if old is not None:  # a tensor still mapped from it stays readable (the file goes with it)
            old.unlink(missing_ok=True)
        self._bytes[key] = path.stat().st_size
        try:
            path.unlink()  # the mapping keeps the data; nothing is left behind if the process dies
        except OSError:  # (Windows: a mapped file cannot be removed; close() does it)
            self._files[key] = path
        self._held[key] = stored
        return stored

    def forget(self, key: Hashable) -> None:
        """The tensor stored under ``key`` is no longer needed (its file goes where still linked;
        the caller drops its reference)."""
        path = self._files.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)
        self._bytes.pop(key, None)
        self._held.pop(key, None)

    def file_bytes(self) -> int:
        """Bytes of the activations now held in files (mapped)."""
        return sum(self._bytes.values())

    def close(self) -> None:
        """Remove the activation files still linked (the tensors mapped from them stay readable
        where unlinking a mapped file is allowed)."""
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        self._bytes.clear()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
