"""Per-modality statistics of the inputs of linear layers, gathered with forward hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..modality import Modality


@dataclass
class ChannelStats:
    """Running per-input-channel statistics of one modality's tokens at one site."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    count: int = 0
    second: torch.Tensor | None = None  # X^T X in float64, when requested

    @classmethod
    def empty(cls, features: int, second_moments: bool, device: torch.device) -> ChannelStats:
        second = torch.zeros(features, features, dtype=torch.float64, device=device) if second_moments else None
        return cls(torch.zeros(features, device=device), torch.zeros(features, dtype=torch.float64, device=device),
                   0, second)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        self.absmax = torch.maximum(self.absmax, rows.abs().amax(0))
        self.abssum += rows.abs().sum(0, dtype=torch.float64)
        self.count += rows.shape[0]
        if self.second is not None:
            r = rows.double()
            self.second += r.T @ r

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()


@dataclass
class SiteStats:
    """Statistics of one linear input, split by modality."""

    per_modality: dict[Modality, ChannelStats] = field(default_factory=dict)

    def absmax(self, modality: Modality | None = None) -> torch.Tensor:
        """Per-channel abs-max of one modality, or over all tokens when ``None``."""
        if modality is not None:
            return self.per_modality[modality].absmax
        return torch.stack([s.absmax for s in self.per_modality.values()]).amax(0)

    def absmean(self, modality: Modality | None = None) -> torch.Tensor:
        if modality is not None:
            return self.per_modality[modality].absmean
        total = sum(s.abssum for s in self.per_modality.values())
        count = sum(s.count for s in self.per_modality.values())
        return (total / max(count, 1)).float()

    def counts(self) -> dict[Modality, int]:
        return {m: s.count for m, s in self.per_modality.items()}


class TokenContext:
    """Modality ids and validity (attention mask) of the sample being run, flattened."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None

    def set(self, ids: torch.Tensor, valid: torch.Tensor) -> None:
        self.ids, self.valid = ids.reshape(-1), valid.reshape(-1).bool()

    def split(self, rows: torch.Tensor) -> dict[Modality, torch.Tensor]:
        """Rows of ``rows`` (``[tokens, features]``) per modality, padding dropped."""
        ids, valid = self.ids.to(rows.device), self.valid.to(rows.device)
        if ids.numel() != rows.shape[0]:
            raise RuntimeError(f"{rows.shape[0]} activation rows for {ids.numel()} tokens")
        return {m: rows[(ids == int(m)) & valid] for m in Modality if bool(((ids == int(m)) & valid).any())}


class StatsCollector:
    """Forward pre-hooks that accumulate ``SiteStats`` for the inputs of named linears; sites in
    ``second_moments`` also accumulate float64 ``X^T X`` of non-text tokens (for compensation), and of text
    tokens with ``text_moments`` (text patches, the shared patch, GPTQ)."""

    def __init__(self, modules: dict[str, nn.Module], tokens: TokenContext, second_moments: set[str] = frozenset(),
                 where: str = "", text_moments: bool = False):
        self.sites = {name: SiteStats() for name in modules}
        self.tokens, self.second_moments, self.where = tokens, second_moments, where
        self.text_moments = text_moments
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            if not torch.isfinite(rows).all():
                raise ValueError(f"NaN/Inf in the input of {self.where}{name} during calibration; "
                                 "check the calibration inputs and the model weights (fp16 overflow?)")
            site = self.sites[name]
            for modality, part in self.tokens.split(rows).items():
                if modality not in site.per_modality:
                    second = name in self.second_moments and (modality != Modality.TEXT or self.text_moments)
                    site.per_modality[modality] = ChannelStats.empty(rows.shape[1], second, rows.device)
                site.per_modality[modality].update(part)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
