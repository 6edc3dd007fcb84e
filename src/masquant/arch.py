"""Architecture knowledge as data: one ``Adapter`` per model family.

An adapter says where the decoder layers are, which linears share an input (a *group*,
fed by one norm or op), which modality each special token belongs to, and what is never
quantized. Every method reads the same declaration; unknown models fail loudly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .modality import Modality, ModalityRouter, ids_from_tokens


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input (dotted paths in the layer)."""

    name: str
    source: str
    linears: tuple[str, ...]
    smooth: bool = True  # smoothed by default; False = only with ``QuantConfig.smooth_down_proj``


LLAMA_GROUPS = (
    LinearGroup("attn_in", "input_layernorm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup("attn_out", "attention values", ("self_attn.o_proj",)),
    LinearGroup("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    LinearGroup("mlp_out", "act(gate) * up", ("mlp.down_proj",), smooth=False),
)


@dataclass(frozen=True)
class Adapter:
    """Where things are in one family of models (paths are relative to the top model)."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    groups: tuple[LinearGroup, ...] = LLAMA_GROUPS
    keep_fp: tuple[str, ...] = ()
    token_attrs: Mapping[Modality, tuple[str, ...]] = field(default_factory=dict)
    token_ids: Mapping[Modality, tuple[int, ...]] = field(default_factory=dict)
    feature_keys: Mapping[Modality, tuple[str, ...]] = field(default_factory=dict)  # inputs that feed them
    gradient_sites: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")  # MBQ's gradient ratios, per layer

    def smoothed(self, group: LinearGroup, smooth_down_proj: bool) -> bool:
        """Whether ``group`` gets smoothing vectors: groups declared ``smooth=False`` (``down_proj``,
        whose input has no norm to absorb a vector) only when the config asks."""
        return group.smooth or smooth_down_proj

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers, self.name)

    def norm(self, model: nn.Module) -> nn.Module:
        return _get(model, self.final_norm, self.name)

    def token_table(self, config: object) -> dict[int, Modality]:
        """Token id -> modality for the special (placeholder) tokens of ``config``."""
        table: dict[int, Modality] = {}
        for modality, attrs in self.token_attrs.items():
            for attr in attrs:
                token = getattr(config, attr, None)
                if token is None:
                    raise ValueError(f"{self.name}: model config has no {attr!r}")
                table[int(token)] = modality
        for modality, tokens in self.token_ids.items():
            table.update({int(t): modality for t in tokens})
        return table

    def router(self, config: object) -> ModalityRouter:
        """The router for a model of this family: its placeholder tokens and feature inputs."""
        return ModalityRouter(self.token_table(config), self.feature_keys)

    def modalities(self, config: object) -> set[Modality]:
        return {Modality.TEXT, *self.token_table(config).values()}

    def validate(self, model: nn.Module) -> None:
        """Check that every declared linear exists in every decoder layer."""
        layers = self.decoder_layers(model)
        if len(layers) == 0:
            raise ValueError(f"{self.name}: {self.layers!r} holds no decoder layers")
        self.norm(model)
        for i, layer in enumerate(layers):
            for group in self.groups:
                for path in group.linears:
                    module = _get(layer, path, self.name, where=f"decoder layer {i}")
                    if not isinstance(module, nn.Linear):
                        raise ValueError(
                            f"{self.name}: layer {i} {path} is {type(module).__name__}, not "
                            "nn.Linear (already quantized? quantize a fresh model)"
                        )


def _get(root: nn.Module, path: str, adapter: str, where: str = "model") -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"adapter {adapter!r}: {where} has no module {path!r}; the adapter does not match "
            "this model (for other architectures build one with masquant.generic_adapter)"
        ) from err


# the inputs whose features the Qwen models merge into vision placeholders (encoder outputs given precomputed too)
VISION_FEATURES = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")

QWEN2_5_VL = Adapter(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    keep_fp=("model.visual", "model.language_model.embed_tokens", "lm_head"),
    token_attrs={Modality.VISION: ("image_token_id", "video_token_id")},
    feature_keys={Modality.VISION: VISION_FEATURES},
)

QWEN2_5_OMNI_THINKER = Adapter(
    name="qwen2_5_omni_thinker",
    model_types=("qwen2_5_omni_thinker",),
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    keep_fp=("model.visual", "model.audio_tower", "model.language_model.embed_tokens", "lm_head"),
    token_attrs={
        Modality.VISION: ("image_token_id", "video_token_id"),
        Modality.AUDIO: ("audio_token_id",),
    },
    feature_keys={Modality.VISION: VISION_FEATURES, Modality.AUDIO: ("input_features",)},
)

# transformers before ~5.2x laid the thinker out flat: model.layers, and the encoders beside model
QWEN2_5_OMNI_THINKER_FLAT = replace(
    QWEN2_5_OMNI_THINKER, name="qwen2_5_omni_thinker_flat", layers="model.layers", final_norm="model.norm",
    keep_fp=("visual", "audio_tower", "model.embed_tokens", "lm_head"))

ADAPTERS = {a.name: a for a in (QWEN2_5_VL, QWEN2_5_OMNI_THINKER, QWEN2_5_OMNI_THINKER_FLAT)}


def generic_adapter(
    layers: str,
    final_norm: str,
    modality_token_ids: Mapping[Modality, Sequence[int]] | None = None,
    groups: Sequence[LinearGroup] = LLAMA_GROUPS,
    keep_fp: Sequence[str] = (),
    name: str = "generic",
    feature_keys: Mapping[Modality, Sequence[str]] | None = None,
) -> Adapter:
    """An adapter for any decoder whose layers hold the given linear groups.

    ``modality_token_ids`` maps each non-text modality to its placeholder token ids;
    ``feature_keys`` names the forward inputs that carry each modality's features (without
    them a placeholder is routed as media in every forward, cached or not).
    """
    tokens = {Modality(m): tuple(int(t) for t in ids) for m, ids in (modality_token_ids or {}).items()}
    features = {Modality(m): tuple(keys) for m, keys in (feature_keys or {}).items()}
    return Adapter(name=name, model_types=(), layers=layers, final_norm=final_norm,
                   groups=tuple(groups), keep_fp=tuple(keep_fp), token_ids=tokens, feature_keys=features)


class UnsupportedArchitectureError(ValueError):
    pass


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter for ``model``'s ``config.model_type`` (of several for one type,
    the one whose decoder layers exist in ``model``: module layouts differ between
    transformers versions)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    matching = [a for a in ADAPTERS.values() if model_type in a.model_types]
    for adapter in matching:
        try:
            model.get_submodule(adapter.layers)
        except AttributeError:
            continue
        return adapter
    if matching:  # none fits: the first one's validate() names what is missing
        return matching[0]
    raise unsupported(type(model).__name__, model_type)


# full models of which masquant quantizes one part (the command line loads it: masquant.io.omni)
QUANTIZED_PART = {"qwen2_5_omni": "thinker"}


def check_model_type(model_type: str | None, name: str) -> None:
    """Refuse a model family no adapter declares (read from a checkpoint's config before loading it)."""
    if model_type not in QUANTIZED_PART and not any(model_type in a.model_types for a in ADAPTERS.values()):
        raise unsupported(name, model_type)


def unsupported(name: str, model_type: str | None) -> UnsupportedArchitectureError:
    hint = ""
    if model_type == "qwen2_5_omni":
        hint = (" For the full Qwen2.5-Omni model, quantize its thinker: model.thinker (masquant quantize --model DIR "
                "does, keeping or dropping the talker with --talker).")
    supported = ", ".join(f"{a.name} ({type_names(a)})" for a in ADAPTERS.values())
    return UnsupportedArchitectureError(
        f"masquant does not support {name} (model_type={model_type!r}). "
        f"Supported: {supported}.{hint} For another decoder-only model pass "
        "adapter=masquant.generic_adapter(layers=..., final_norm=..., modality_token_ids=...)."
    )


def type_names(adapter: Adapter) -> str:
    return "model_type " + "/".join(adapter.model_types)


def layer_output(out: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tuple whose first item they are, or the
    tensor alone, depending on the transformers version)."""
    return out[0] if isinstance(out, tuple) else out


def modality_ids(model: nn.Module, input_ids: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
    """Modality of every token of ``input_ids`` (same shape, ``torch.long``)."""
    adapter = adapter or get_adapter(model)
    return ids_from_tokens(input_ids, adapter.token_table(model.config))
