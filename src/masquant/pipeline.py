"""Layer-by-layer calibration: statistics, fit, quantize, measure, feed forward.

Only the current decoder layer's activations are resident: the inputs of every sample,
the full-precision outputs (targets) and, transiently, the quantized outputs that become
the next layer's inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter, LinearGroup
from .capture import Captured
from .config import QuantConfig
from .modality import NUM_MODALITIES, ModalityRouter
from .qlinear import QuantLinear, replace_module
from .report import LayerReport, LinearReport, SqnrMeter, activation_summary
from .stats import SiteStats, StatsCollector, TokenContext


@dataclass
class LayerPlan:
    """What a method decided for one layer: a smoothing table ``[modalities, in]`` per group."""

    smooth: dict[str, torch.Tensor]
    info: dict[str, dict] = field(default_factory=dict)


@dataclass
class LayerContext:
    """Everything a method may look at while fitting one decoder layer."""

    index: int
    layer: nn.Module
    adapter: Adapter
    config: QuantConfig
    router: ModalityRouter
    samples: list[Captured]
    tokens: TokenContext
    stats: dict[str, SiteStats] = field(default_factory=dict)
    fp_outputs: list[torch.Tensor] = field(default_factory=list)

    def groups(self) -> list[LinearGroup]:
        return list(self.adapter.groups)

    def smoothed(self, group: LinearGroup) -> bool:
        return group.smooth or (self.config.smooth_down_proj and group.name == "mlp_out")

    def linears(self, group: LinearGroup) -> list[nn.Linear]:
        return [self.layer.get_submodule(p) for p in group.linears]

    def site(self, group: LinearGroup) -> SiteStats:
        """Input statistics of a group (its linears share one input)."""
        return self.stats[group.linears[0]]

    def identity(self, group: LinearGroup) -> torch.Tensor:
        features = self.linears(group)[0].in_features
        return torch.ones(NUM_MODALITIES, features, device=self.linears(group)[0].weight.device)

    @contextlib.contextmanager
    def sample_scope(self, sample: Captured) -> Iterator[None]:
        self.tokens.set(sample.ids, sample.valid)
        with self.router.scope(sample.ids):
            yield

    def run(self, sample_index: int) -> torch.Tensor:
        sample = self.samples[sample_index]
        with self.sample_scope(sample):
            out = self.layer(sample.hidden, **sample.layer_kwargs[self.index])
        return out[0] if isinstance(out, tuple) else out

    def run_all(self) -> list[torch.Tensor]:
        return [self.run(i) for i in range(len(self.samples))]

    def collect(self, second_moments: bool = False) -> None:
        """Run the full-precision layer once: input statistics and target outputs."""
        paths = [p for g in self.groups() for p in g.linears]
        collector = StatsCollector({p: self.layer.get_submodule(p) for p in paths}, self.tokens,
                                   second_moments, where=f"layer {self.index} ")
        try:
            self.fp_outputs = self.run_all()
        finally:
            collector.remove()
        self.stats = collector.sites

    def block_mse(self, smooth: dict[str, torch.Tensor]) -> float:
        """Mean squared error of the layer output against FP, with only the given groups quantized."""
        with self.quantized(smooth):
            total, count = 0.0, 0
            for i, sample in enumerate(self.samples):
                diff = (self.run(i) - self.fp_outputs[i])[sample.valid]
                total += float(diff.double().pow(2).sum())
                count += diff.numel()
        return total / max(count, 1)

    @contextlib.contextmanager
    def quantized(self, smooth: dict[str, torch.Tensor]) -> Iterator[dict[str, nn.Linear]]:
        """Temporarily swap the linears of the named groups for ``QuantLinear``s."""
        originals = self.apply(LayerPlan(smooth))
        try:
            yield originals
        finally:
            for path, linear in originals.items():
                replace_module(self.layer, path, linear)

    def apply(self, plan: LayerPlan) -> dict[str, nn.Linear]:
        """Swap in quantized linears; returns the original modules by path."""
        originals = {}
        for group in self.groups():
            if group.name not in plan.smooth:
                continue
            for path in group.linears:
                linear = self.layer.get_submodule(path)
                qlinear = QuantLinear.from_linear(linear, plan.smooth[group.name], self.config, self.router)
                originals[path] = replace_module(self.layer, path, qlinear)
        return originals

    def measure(self, originals: dict[str, nn.Linear]) -> tuple[list[torch.Tensor], LayerReport]:
        """Run the quantized layer: outputs for the next layer and per-modality SQNR."""
        meters = {path: SqnrMeter() for path in originals}
        handles = [self.layer.get_submodule(p).register_forward_hook(self._sqnr_hook(lin, meters[p]))
                   for p, lin in originals.items()]
        layer_meter, outputs = SqnrMeter(), []
        try:
            for i, _sample in enumerate(self.samples):
                out = self.run(i)
                outputs.append(out)
                ref, q = (o.reshape(-1, o.shape[-1]) for o in (self.fp_outputs[i], out))
                layer_meter.add(self.tokens.split(ref), self.tokens.split(q))
        finally:
            for handle in handles:
                handle.remove()
        linears = {p: LinearReport(meters[p].result(), activation_summary(self.stats[p])) for p in originals}
        return outputs, LayerReport(self.index, layer_meter.result(), linears)

    def _sqnr_hook(self, fp_linear: nn.Linear, meter: SqnrMeter) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            ref = F.linear(x, fp_linear.weight, fp_linear.bias)
            ref, q = (t.reshape(-1, t.shape[-1]) for t in (ref, output))
            meter.add(self.tokens.split(ref), self.tokens.split(q))
        return hook


Method = Callable[[LayerContext], LayerPlan]


@torch.no_grad()
def quantize_layers(model: nn.Module, adapter: Adapter, samples: list[Captured], config: QuantConfig,
                    router: ModalityRouter, method: Method, progress: bool = True) -> list[LayerReport]:
    """Quantize every decoder layer in order; each layer sees the quantized previous ones."""
    layers = adapter.decoder_layers(model)
    tokens, reports = TokenContext(), []
    second = getattr(method, "second_moments", False)
    bar = tqdm(range(len(layers)), desc=f"{config.method} W{config.w_bits}A{config.a_bits}",
               unit="layer", disable=not progress)
    for i in bar:
        ctx = LayerContext(i, layers[i], adapter, config, router, samples, tokens)
        ctx.collect(second_moments=second)
        plan = method(ctx)
        originals = ctx.apply(plan)
        outputs, report = ctx.measure(originals)
        report.groups = plan.info
        for sample, out in zip(samples, outputs, strict=False):
            sample.hidden = out
        reports.append(report)
        bar.set_postfix({k: f"{v:.1f}dB" for k, v in report.output_sqnr.items()})
    return reports
