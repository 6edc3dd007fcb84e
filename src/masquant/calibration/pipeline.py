"""Layer-by-layer calibration: statistics, fit, quantize, measure, feed forward.

Only the current decoder layer's activations are kept (inputs, full-precision targets, quantized
outputs for the next layer), in an ``ActivationStore`` that moves them to the device one sample at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, LinearGroup, layer_output
from ..config import QuantConfig
from ..modality import NUM_MODALITIES, Modality, ModalityRouter
from ..runtime.qlinear import QuantLinear, replace_module
from . import distributed, gptq
from .capture import Captured
from .checkpoint import LayerCheckpoint, layer_digest
from .offload import ActivationStore
from .report import LayerReport, LinearReport, SqnrMeter, activation_summary
from .stats import SiteStats, StatsCollector, TokenContext

log = logging.getLogger("masquant")


class Patcher(Protocol):
    """Adds patches to one quantized linear of a smoothed group (CMC); returns its report entry."""

    def __call__(self, ctx: LayerContext, qlinear: QuantLinear, linear: nn.Linear, path: str,
                 report: bool) -> dict: ...


@dataclass
class LayerPlan:
    """What a method decided for one layer.

    * ``smooth``: a smoothing table ``[modalities, in]`` per group;
    * ``per_modality_weights``: non-text modalities with their own quantized weight (MAS-only);
    * ``patch``: called on every quantized linear of a smoothed group (MASQuant's CMC);
    * ``records``: report dataclasses by group name (or a layer-level key), via ``dataclasses.asdict``.
    """

    smooth: dict[str, torch.Tensor]
    per_modality_weights: tuple[Modality, ...] = ()
    patch: Patcher | None = None
    records: dict[str, Any] = field(default_factory=dict)
    patch_records: dict[str, dict] = field(default_factory=dict)  # filled by ``apply``: the patches' entries


@dataclass
class LayerContext:
    """Everything a method may look at while fitting one decoder layer. ``samples[i].hidden`` (input) and
    ``fp_outputs[i]`` (full-precision output) may be offloaded: use ``run(i)`` and ``target(i)``, which bring
    them to the layer's device; ``layer_kwargs`` (rotary tables, masks) stay on the compute device."""

    index: int
    layer: nn.Module
    adapter: Adapter
    config: QuantConfig
    router: ModalityRouter
    samples: list[Captured]
    tokens: TokenContext
    stats: dict[str, SiteStats] = field(default_factory=dict)
    fp_outputs: list[torch.Tensor] = field(default_factory=list)
    ratios: list[dict[Modality, float]] | None = None  # MBQ gradient ratios per layer, if the method asked
    patches: dict = field(default_factory=dict)  # CMC patches already derived in this layer (by vectors)
    store: ActivationStore = field(default_factory=ActivationStore)

    @property
    def settings(self) -> Any:
        """The method's own settings (its dataclass in ``masquant.methods``)."""
        return self.config.settings

    @property
    def device(self) -> torch.device:
        """Where the layer computes."""
        return next(self.layer.parameters()).device

    def target(self, sample_index: int) -> torch.Tensor:
        """The full-precision output of the layer for one sample (after ``collect``), on its device."""
        return self.fp_outputs[sample_index].to(self.device)

    def groups(self) -> list[LinearGroup]:
        return list(self.adapter.groups)

    def smoothed(self, group: LinearGroup) -> bool:
        return self.adapter.smoothed(group, self.config.smooth_down_proj)

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
            return layer_output(self.layer(sample.hidden.to(self.device), **sample.layer_kwargs[self.index]))

    def sample_count(self) -> int:
        """Calibration batches of the whole run (``samples`` holds this process's share)."""
        return distributed.all_reduce_ints([len(self.samples)])[0]

    def modalities(self) -> list[Modality]:
        """Modalities with calibration tokens in this layer."""
        return sorted({m for site in self.stats.values() for m in site.per_modality})

    def collect(self, second_moments: bool = False, text: bool = False, every_group: bool = False) -> None:
        """Run the full-precision layer once for input statistics (with ``second_moments``, also ``X^T X`` at
        smoothed groups, or every group, of non-text tokens, and of text ones with ``text``) and target outputs.
        Data-parallel: statistics merged over processes, outputs local."""
        paths = [g.linears[0] for g in self.groups()]  # a group's linears share one input
        second = {g.linears[0] for g in self.groups() if second_moments and (every_group or self.smoothed(g))}
        collector = StatsCollector({p: self.layer.get_submodule(p) for p in paths}, self.tokens,
                                   second, where=f"layer {self.index} ", text_moments=text)
        try:
            self.fp_outputs = [self.store.put(("target", i), self.run(i)) for i in range(len(self.samples))]
        finally:
            collector.remove()
        self.stats = collector.sites
        distributed.all_reduce_sites(self.stats, self.device)
        for group in self.groups():
            for path in group.linears[1:]:
                self.stats[path] = self.stats[group.linears[0]]

    def block_mse(self, smooth: dict[str, torch.Tensor], weights: dict[Modality, float] | None = None,
                  answer_only: bool = False) -> float:
        """Squared error of the layer output against FP with only the given groups quantized: plain MSE over valid
        tokens, or each modality's error scaled by ``weights``; ``answer_only`` drops non-answer text tokens (MBQ).
        Summed over data-parallel processes."""
        per_modality = torch.ones(NUM_MODALITIES, dtype=torch.float64)
        if weights is not None:
            per_modality = torch.tensor([weights.get(m, 0.0) for m in Modality], dtype=torch.float64)
        with self.quantized(LayerPlan(smooth)):
            total, count = 0.0, 0
            for i in range(len(self.samples)):
                sample = self.samples[i]
                target = self.target(i)
                err = (self.run(i) - target).double().pow(2).sum(-1)
                keep = sample.valid
                if answer_only:
                    keep = keep & (sample.answer | (sample.ids != int(Modality.TEXT)))
                total += float((err * per_modality.to(err.device)[sample.ids.to(err.device)])[keep].sum())
                count += int(keep.sum()) * target.shape[-1]
        total, count = distributed.all_reduce_floats([total, count])
        return total / max(count, 1)

    @contextlib.contextmanager
    def quantized(self, plan: LayerPlan) -> Iterator[dict[str, nn.Linear]]:
        """Temporarily swap the linears of ``plan``'s groups for ``QuantLinear``s (a trial)."""
        originals = self.apply(plan, report=False)
        try:
            yield originals
        finally:
            for path, linear in originals.items():
                replace_module(self.layer, path, linear)

    def apply(self, plan: LayerPlan, report: bool = True) -> dict[str, nn.Linear]:
        """Swap in quantized linears (and their patches); returns the original modules by path.
        ``report=False``: a trial (block_mse), whose patch entries are not completed."""
        originals = {}
        for group in self.groups():
            if group.name not in plan.smooth:
                continue
            table = plan.smooth[group.name]
            distinct = not bool((table == table[:1]).all())  # MAS-only: extra weights only where rows differ
            for path in group.linears:
                linear = self.layer.get_submodule(path)
                qlinear = QuantLinear.from_linear(linear, table, self.config, self.router,
                                                  plan.per_modality_weights if distinct else ())
                if report and self.config.w_rounding == "gptq":  # (trials round to nearest: GPTQ for the result)
                    gptq.round_stored(qlinear, linear, self.stats[path])
                if plan.patch is not None and self.smoothed(group):
                    plan.patch_records[path] = plan.patch(self, qlinear, linear, path, report)
                originals[path] = replace_module(self.layer, path, qlinear)
        return originals

    def measure(self, originals: dict[str, nn.Linear]) -> tuple[list[torch.Tensor], LayerReport]:
        """Run the quantized layer: outputs for the next layer (in ``store``'s form) and per-modality SQNR."""
        meters = {path: SqnrMeter() for path in originals}
        handles = [self.layer.get_submodule(p).register_forward_hook(self._sqnr_hook(lin, meters[p]))
                   for p, lin in originals.items()]
        layer_meter, outputs = SqnrMeter(), []
        try:
            for i, _sample in enumerate(self.samples):
                out = self.run(i)
                ref, q = (o.reshape(-1, o.shape[-1]) for o in (self.target(i), out))
                layer_meter.add(self.tokens.split(ref), self.tokens.split(q))
                outputs.append(self.store.put(("hidden", i), out))
        finally:
            for handle in handles:
                handle.remove()
        distributed.all_reduce_meters([layer_meter, *meters.values()])
        linears = {p: LinearReport(meters[p].result(), activation_summary(self.stats[p]),
                                   self.layer.get_submodule(p).storage_bytes()) for p in originals}
        return outputs, LayerReport(self.index, layer_meter.result(), linears)

    def _sqnr_hook(self, fp_linear: nn.Linear, meter: SqnrMeter) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            ref = F.linear(x, fp_linear.weight, fp_linear.bias)
            ref, q = (t.reshape(-1, t.shape[-1]) for t in (ref, output))
            meter.add(self.tokens.split(ref), self.tokens.split(q))
        return hook


class LayerMethod(Protocol):
    """What the pipeline reads of a method (``masquant.methods.registry.Method``)."""

    second_moments: bool

    def text_moments(self, settings: Any) -> bool: ...  # X^T X of text tokens too

    def fit(self, ctx: LayerContext) -> LayerPlan: ...


class LayerSource(Protocol):
    """Where decoder layers come from when they do not all fit in memory (``masquant.calibration.streaming``)."""

    def load(self, index: int, layer: nn.Module) -> None: ...  # give the meta-device layer its weights

    def release(self, index: int, layer: nn.Module) -> None: ...  # write the quantized layer and free it

    def unload(self, index: int, layer: nn.Module) -> None: ...  # free the layer without writing it


@torch.no_grad()
def quantize_layers(model: nn.Module, adapter: Adapter, samples: list[Captured], config: QuantConfig,
                    router: ModalityRouter, method: LayerMethod, ratios: list | None = None,
                    progress: bool = True, checkpoint: LayerCheckpoint | None = None,
                    source: LayerSource | None = None, store: ActivationStore | None = None) -> list[LayerReport]:
    """Quantize every decoder layer in order, each seeing the quantized previous ones. ``checkpoint`` saves each
    finished layer and restores those already done; ``source`` (streaming) loads each layer just in time and
    frees it after; ``store`` keeps the activations between uses (default: on the compute device)."""
    store = store or ActivationStore()
    load = source.load if source is not None else lambda i, layer: None
    release = source.release if source is not None else lambda i, layer: None
    layers = adapter.decoder_layers(model)
    tokens, reports = TokenContext(), []
    start = 0 if checkpoint is None else checkpoint.finished()
    for i in range(start):  # resuming: the finished layers come from the state directory
        load(i, layers[i])
        reports.append(checkpoint.restore_layer(i, layers[i], config, router))
        release(i, layers[i])
    device = torch.device("cpu") if store.host else samples[0].hidden.device
    # the first layer's inputs as captured, or the saved inputs of the first layer to run
    inputs = (s.hidden for s in samples) if not start else checkpoint.hidden(start - 1, device)
    for j, (sample, hidden) in enumerate(zip(samples, inputs, strict=True)):
        sample.hidden = store.put(("hidden", j), hidden)
    if start:
        log.info("resuming after layer %d/%d", start, len(layers))
    bar = tqdm(range(start, len(layers)), desc=f"{config.method} W{config.w_bits}A{config.a_bits}",
               unit="layer", disable=not progress, initial=start, total=len(layers))
    for i in bar:
        load(i, layers[i])
        fp_digest = layer_digest(layers[i]) if checkpoint is not None else ""
        ctx = LayerContext(i, layers[i], adapter, config, router, samples, tokens, ratios=ratios, store=store)
        gptq_rounding = config.w_rounding == "gptq"
        ctx.collect(second_moments=method.second_moments or gptq_rounding, every_group=gptq_rounding,
                    text=gptq_rounding or method.text_moments(config.settings))
        plan = method.fit(ctx)
        originals = ctx.apply(plan)
        outputs, report = ctx.measure(originals)
        report.groups = {k: dataclasses.asdict(v) for k, v in plan.records.items()}
        for path, entry in plan.patch_records.items():
            report.linears[path].compensation = entry
        for sample, out in zip(samples, outputs, strict=False):
            sample.hidden = out
        reports.append(report)
        if checkpoint is not None:
            checkpoint.save_layer(i, layers[i], list(originals), report, [s.hidden for s in samples], fp_digest)
        del ctx, plan, originals, outputs  # the layer's full-precision linears and targets go now
        release(i, layers[i])
        sqnr = {k: f"{v:.1f}dB" for k, v in report.output_sqnr.items()}
        bar.set_postfix(sqnr)
        log.info("layer %d/%d: output SQNR %s", i + 1, len(layers), ", ".join(f"{k} {v}" for k, v in sqnr.items()))
    return reports
