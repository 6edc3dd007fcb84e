"""Export a saved masquant model in the ``compressed-tensors`` layout (what vLLM loads): the
**text path**, every token treated as a text token.

* Linears fed by an RMSNorm (q/k/v, gate/up): ``s_text`` is folded into the norm weight
  (``g / s_text``) and the stored codes and scales are exported as they are: exact.
* Other smoothed linears (``o_proj``, ``down_proj`` with ``smooth_down_proj``) cannot absorb a
  per-channel scale, so ``Q(W * s_text) / s_text`` is re-quantized with RTN on the same grid (logged).
* Weights: ``pack-quantized`` for weight-only below 8 bits, else ``int-quantized``; activations:
  dynamic per-token at ``a_bits`` when ``a_bits`` < 16.

The sidecar ``masquant_sidecar.safetensors`` + ``.json`` keeps what the text path drops: per linear the
smoothing table ``smooth`` (rows text, vision, audio) and CMC patches ``patches.<modality>.l1/l2``. A
token of modality m takes input ``x * s_text / s_m`` and adds ``(x / s_m) @ l1 @ l2``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..arch import get_adapter
from ..runtime.primitives import quantize_weight
from ..runtime.qlinear import IntWeight, QuantLinear, replace_module
from .serialization import read_meta, refuse_nonempty, staged_directory
from .sidecar import SIDECAR

log = logging.getLogger("masquant")



def export_compressed_tensors(source: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the compressed-tensors checkpoint of the saved model at ``source`` to ``out``."""
    try:
        from compressed_tensors.compressors import ModelCompressor
    except ImportError as err:
        raise ImportError("masquant export needs the compressed-tensors package: "
                          "pip install 'masquant[export]'") from err
    from safetensors.torch import save_file

    from .loading import load_any
    from .omni import is_full_dir

    out = Path(out)
    refuse_nonempty(out, overwrite)  # before the (slow) load, and again when writing
    if is_full_dir(Path(source)):
        log.warning("%s holds a full Qwen2.5-Omni model: its quantized thinker is exported (as vLLM serves "
                    "Qwen2.5-Omni, text out); the talker and token2wav are not", source)
    model, processor, _ = load_any(str(source))  # (a full Qwen2.5-Omni model: its thinker)
    config = getattr(model, "masquant_config", None)
    if config is None:
        raise ValueError(f"{source} is not a model saved by masquant quantize")
    if not config.w_symmetric:
        raise ValueError("export supports symmetric weight grids for now: transformers "
                         "cannot load pack-quantized asymmetric zero points back (packed vs unpacked shapes); "
                         "quantize with symmetric weights to export")
    if config.method == "mas":
        raise ValueError("MAS-only models keep one weight per modality, which compressed-tensors cannot hold; "
                         "export a masquant (one weight + patches) or single-vector model instead")
    dense, scales, notes = text_path(model)
    scheme = quantization_config(config, targets=sorted(scales))
    from compressed_tensors.quantization import apply_quantization_config

    apply_quantization_config(dense, scheme)
    for name, (scale, zero) in scales.items():
        module = dense.get_submodule(name)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if getattr(module, "weight_zero_point", None) is not None:
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape).round())
    fmt = "pack-quantized" if config.w_bits < 8 and config.a_bits >= 16 else "int-quantized"
    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format=fmt)
    compressor.compress_model(dense)
    with staged_directory(out, overwrite) as tmp:
        dense.config.architectures = [type(dense).__name__]
        dense.save_pretrained(tmp)
        compressor.update_config(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        tensors, layout = sidecar(model)
        save_file(tensors, str(tmp / f"{SIDECAR}.safetensors"))
        summary = {"format": fmt, "w_bits": config.w_bits, "a_bits": config.a_bits, "method": config.method,
                   "modalities": ["text", "vision", "audio"], "linears": layout, "requantized": notes,
                   "reference": read_meta(source).get("reference")}
        (tmp / f"{SIDECAR}.json").write_text(json.dumps(summary, indent=1))
    log.info("exported %d linears (%s) to %s; %d re-quantized without smoothing", len(scales), fmt, out, len(notes))
    return summary


def text_path(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """A dense copy whose decoder linears hold the dequantized text-path weights, the scales and
    zero points to export with them, and the linears that had to be re-quantized."""
    dense = copy.deepcopy(model)
    adapter = get_adapter(dense)
    scales, notes = {}, []
    prefix = adapter.layers
    for i, layer in enumerate(adapter.decoder_layers(dense)):
        for group in adapter.groups:
            first = layer.get_submodule(group.linears[0])
            if not isinstance(first, QuantLinear):
                continue
            s_text = first.smooth[0].clone()
            norm = _norm(layer, group.source, first.in_features)
            fold = norm is not None and not torch.allclose(s_text, torch.ones_like(s_text))
            if fold:
                with torch.no_grad():
                    norm.weight.div_(s_text.to(norm.weight.dtype))
            for path in group.linears:
                q = layer.get_submodule(path)
                weight = q.dequantized_weight().float()
                stored = q.qweight  # signed codes: W = scale * (codes - zero), as compressed-tensors stores them
                if not fold and not torch.allclose(s_text, torch.ones_like(s_text)):
                    stored = IntWeight(q.out_features, q.in_features, q.grid, q.w_group_size)
                    stored.set(quantize_weight(weight / s_text, q.grid, q.w_group_size))
                    weight = stored.dequantize(torch.float32)
                    notes.append(f"{prefix}.{i}.{path}")
                scale, zero = stored.scale, stored.zero
                linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if q.bias is not None:
                        linear.bias.copy_(q.bias)
                replace_module(layer, path, linear.to(q.compute_dtype))
                scales[f"{prefix}.{i}.{path}"] = (scale.clone(), zero.clone())
    if notes:
        log.warning("export: %d linears cannot fold their text smoothing into a norm and were re-quantized "
                    "(text path approximate there): %s", len(notes), ", ".join(notes[:4]))
    return dense, scales, notes


def _norm(layer: nn.Module, source: str, width: int) -> nn.Module | None:
    try:
        module = layer.get_submodule(source)
    except AttributeError:
        return None
    weight = getattr(module, "weight", None)
    return module if isinstance(weight, torch.Tensor) and weight.shape == (width,) else None


def quantization_config(config, targets: list[str]):
    """The compressed-tensors scheme of a ``QuantConfig``'s text path."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    strategy = {0: "channel", -1: "tensor"}.get(config.w_group_size, "group")
    weights = QuantizationArgs(num_bits=config.w_bits, type="int", symmetric=config.w_symmetric, strategy=strategy,
                               group_size=config.w_group_size if strategy == "group" else None)
    acts = None
    if config.a_bits < 16:
        acts = QuantizationArgs(num_bits=config.a_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=targets, weights=weights, input_activations=acts)
    return QuantizationConfig(config_groups={"group_0": scheme}, quantization_status=QuantizationStatus.CALIBRATION)


def sidecar(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Per quantized linear: its smoothing table and CMC patches (what the text path drops)."""
    tensors, layout = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and (not module.uniform or module.patches):
            tensors[f"{name}.smooth"] = module.smooth.contiguous()
            for m, patch in module.patches.items():
                tensors[f"{name}.patches.{m}.l1"] = patch.l1.contiguous()
                tensors[f"{name}.patches.{m}.l2"] = patch.l2.contiguous()
            layout[name] = {"patches": {m: int(p.l1.shape[1]) for m, p in module.patches.items()}}
    return tensors, layout
