"""Toy-sized checkpoint directories laid out as the Hub's downloads of Qwen2.5-VL-3B/7B-Instruct and
Qwen2.5-Omni-3B/7B: the same file set and formats (legacy flat ``config.json`` with ``rope_scaling``
mrope, bfloat16 weights in safetensors shards with ``model.safetensors.index.json`` under the Hub's
key names, Qwen's tokenizer files with its special tokens at their real ids, ``chat_template.json``,
the image / video / Whisper processor settings, Omni's ``spk_dict.pt``), random weights, tiny widths.

The vocabulary keeps the real size and special-token ids (151643...); its ordinary part is a small
byte-level BPE, so the rows between are never produced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Qwen2's pre-tokenizer split (before the byte-level mapping)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
_TAIL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<|repo_name|>", "<|file_sep|>"]  # (added, not special)
VL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
             "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", *_TAIL]
OMNI_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
               "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
               "<|IMAGE|>", "<|VIDEO|>", *_TAIL]
FIRST_SPECIAL = 151643
HIDDEN, MROPE = 128, [8, 12, 12]  # two heads of 64 (Qwen's 128-wide heads split 16 / 24 / 24)
OMNI_NAMED = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
VL_SYSTEM = "You are a helpful assistant."
OMNI_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
               "auditory and visual inputs, as well as generating text and speech.")


def _template(system: str, image: str, video: str, audio: str | None) -> str:
    """A chat template in Qwen's form: a default system turn, one placeholder per media item
    (``Picture N:`` / ``Video N:`` / ``Audio N:`` with ``add_vision_id`` / ``add_audio_id``)."""
    counters = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    items = ("{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
             "{% set image_count.value = image_count.value + 1 %}"
             "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}" + image +
             "{% elif content['type'] == 'video' or 'video' in content %}"
             "{% set video_count.value = video_count.value + 1 %}"
             "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}" + video)
    if audio:
        counters += "{% set audio_count = namespace(value=0) %}"
        items += ("{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
                  "{% set audio_count.value = audio_count.value + 1 %}"
                  "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}" + audio)
    return (counters + "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
            "<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
            "{% for content in message['content'] %}" + items +
            "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


VL_TEMPLATE = _template(VL_SYSTEM, "<|vision_start|><|image_pad|><|vision_end|>",
                        "<|vision_start|><|video_pad|><|vision_end|>", None)
OMNI_TEMPLATE = _template(OMNI_SYSTEM, "<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_bos|><|VIDEO|><|vision_eos|>",
                          "<|audio_bos|><|AUDIO|><|audio_eos|>")
CORPUS = ["What is this item? Describe the picture in one word.", "It was the best of times, it was the worst "
          "of times.", VL_SYSTEM, OMNI_SYSTEM, "Listen to the clip and say what you hear. A shirt, a shoe, a bag."]


def write_tokenizer(path: Path, tokens: list[str], template: str, named: dict[str, str] | None = None) -> None:
    """``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (Qwen2Tokenizer,
    ``added_tokens_decoder`` at the real ids) and the files Qwen's downloads keep beside them."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())
    vocab = dict(data["model"]["vocab"])
    ids = {t: FIRST_SPECIAL + i for i, t in enumerate(tokens)}
    # (the BPE model holds the special tokens at their ids too: tokenizers renumbers added tokens that
    # do not follow the model's vocabulary, and the real one is 151643 entries long)
    data["model"]["vocab"] = {**vocab, **ids}
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": t not in _TAIL} for t, i in ids.items()]
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = [t for t in tokens[1:] if t not in _TAIL]
    config = {"add_bos_token": False, "add_prefix_space": False,
              "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": t not in _TAIL}
                                       for t, i in ids.items()},
              "additional_special_tokens": specials, "bos_token": None, "chat_template": template,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    if named:
        config["extra_special_tokens"] = named
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))


def write_shards(path: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``, as the Hub has them."""
    from safetensors.torch import save_file

    names = sorted(tensors)
    step = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = {k: tensors[k].contiguous() for k in names[i * step:(i + 1) * step]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))


def hub_names(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The installed transformers' names -> the Hub's: ``model.language_model.X`` -> ``model.X``,
    ``model.visual`` / ``model.audio_tower`` -> ``visual`` / ``audio_tower`` (under ``prefix``)."""
    p = re.escape(prefix)
    rules = [(rf"^{p}model\.language_model\.", f"{prefix}model."), (rf"^{p}model\.visual\.", f"{prefix}visual."),
             (rf"^{p}model\.audio_tower\.", f"{prefix}audio_tower.")]
    out = {}
    for key, value in state.items():
        for pattern, new in rules:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def _vision(out: int, tokens_per_second: int) -> dict:
    return {"depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "in_chans": 3, "out_hidden_size": out, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": tokens_per_second,
            "temporal_patch_size": 2}


def _text(hidden: int) -> dict:
    # (heads of 64 channels: vLLM's CPU attention takes no narrower ones)
    return {"hidden_act": "silu", "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": hidden // 64,
            "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "sliding_window": 32768, "use_cache": True, "use_sliding_window": False}


def vl_config(size: str = "3b", hidden: int = HIDDEN) -> dict:
    """Qwen2.5-VL-*-Instruct's ``config.json`` (legacy flat form), toy widths: ``3b`` ties the head to
    the embeddings (vocabulary 151936), ``7b`` does not (152064)."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656, "initializer_range": 0.02, "model_type": "qwen2_5_vl", **_text(hidden),
            "tie_word_embeddings": size == "3b", "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
            "vision_config": _vision(hidden, 2), "rope_scaling": {"type": "mrope", "mrope_section": MROPE},
            "vocab_size": 151936 if size == "3b" else 152064}


def omni_config(hidden: int = HIDDEN) -> dict:
    """Qwen2.5-Omni's ``config.json``: thinker (text, vision, Whisper-style audio), talker and token2wav."""
    rope = {"mrope_section": MROPE, "rope_type": "default", "type": "default"}
    thinker = {
        "architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"], "model_type": "qwen2_5_omni_thinker",
        "audio_config": {"activation_function": "gelu", "d_model": 32, "encoder_attention_heads": 2,
                         "encoder_ffn_dim": 64, "encoder_layers": 1, "max_source_positions": 1500,
                         "model_type": "qwen2_5_omni_audio_encoder", "n_window": 100, "num_hidden_layers": 1,
                         "num_mel_bins": 128, "output_dim": hidden, "scale_embedding": False},
        "text_config": {**_text(hidden), "model_type": "qwen2_5_omni_text", "rope_scaling": rope,
                        "vocab_size": 151936, "tie_word_embeddings": True},
        "vision_config": {**_vision(hidden, 25), "embed_dim": 32, "in_channels": 3,
                          "model_type": "qwen2_5_omni_vision_encoder"},
        "audio_token_index": 151646, "audio_start_token_id": 151647, "audio_end_token_id": 151648,
        "image_token_index": 151655, "video_token_index": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "bos_token_id": 151644, "eos_token_id": 151645,
        "pad_token_id": 151643, "position_id_per_seconds": 25, "seconds_per_chunk": 2, "user_token_id": 872,
        "ignore_index": -100, "init_std": 0.02, "torch_dtype": "bfloat16", "tie_word_embeddings": True}
    talker = {
        "architectures": ["Qwen2OmniTalkerForConditionalGeneration"], "model_type": "qwen2_5_omni_talker",
        "embedding_size": hidden, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "num_hidden_layers": 1, "vocab_size": 8448, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "rope_scaling": {**rope, "mrope_section": [2, 3, 3]},
        "audio_token_index": 151646, "audio_start_token_id": 151647, "audio_end_token_id": 151648,
        "image_token_index": 151655, "video_token_index": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tts_codec_start_token_id": 8293, "tts_codec_end_token_id": 8294,
        "tts_codec_pad_token_id": 8292, "tts_codec_mask_token_id": 8296, "tts_text_start_token_id": 151860,
        "tts_text_end_token_id": 151861, "tts_text_pad_token_id": 151859, "position_id_per_seconds": 25,
        "seconds_per_chunk": 2, "spatial_merge_size": 2, "torch_dtype": "bfloat16"}
    token2wav = {
        "model_type": "qwen2_5_omni_token2wav",
        "dit_config": {"model_type": "qwen2_5_omni_dit", "hidden_size": 32, "dim": 32, "num_hidden_layers": 1,
                       "depth": 1, "num_attention_heads": 2, "heads": 2, "head_dim": 16, "ff_mult": 2, "emb_dim": 16,
                       "mel_dim": 80, "num_embeds": 8193, "block_size": 24, "look_ahead_layers": [0],
                       "look_backward_layers": [0], "repeats": 2, "enc_emb_dim": 16, "enc_dim": 16,
                       "enc_channels": [16, 16, 16, 16, 48], "enc_kernel_sizes": [5, 3, 3, 3, 1],
                       "enc_dilations": [1, 2, 3, 4, 1], "enc_attention_channels": 8, "enc_res2net_scale": 2,
                       "enc_se_channels": 8, "enc_lin_neurons": 16, "dropout": 0.1},
        "bigvgan_config": {"model_type": "qwen2_5_omni_bigvgan", "mel_dim": 80, "upsample_initial_channel": 128,
                           "resblock_kernel_sizes": [3, 7, 11],
                           "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                           "upsample_rates": [5, 3, 2, 2, 2, 2], "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4]}}
    return {"architectures": ["Qwen2_5OmniForConditionalGeneration"], "enable_audio_output": True,
            "enable_talker": True, "model_type": "qwen2_5_omni", "thinker_config": thinker, "talker_config": talker,
            "token2wav_config": token2wav, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0"}


def _image_processor(processor_class: str) -> dict:
    return {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": MEAN, "image_std": STD, "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": processor_class}


def _random_model(path: Path, cls_name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for the ``config.json`` in ``path``, as the installed transformers names them
    (bfloat16, as the Hub stores them; the token2wav model stays float32 in the full Omni)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = getattr(transformers, cls_name)(config)
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).clone()
            for k, v in model.state_dict().items()}


def write_qwen2_5_vl(path: Path, size: str = "3b", seed: int = 0) -> dict[str, torch.Tensor]:
    """A Qwen2.5-VL-{3B,7B}-Instruct download at ``path``; returns its tensors by Hub name."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(vl_config(size), indent=2))
    state = hub_names(_random_model(path, "Qwen2_5_VLForConditionalGeneration", seed))
    if size == "3b":
        state.pop("lm_head.weight", None)  # (tied: the Hub's 3B checkpoint has no head tensor)
    write_shards(path, state, shards=2)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
         "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
         "transformers_version": "4.49.0"}, indent=2))
    write_tokenizer(path, VL_TOKENS, VL_TEMPLATE)
    image = _image_processor("Qwen2_5_VLProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    video = {k: v for k, v in image.items() if k != "image_processor_type"}
    (path / "video_preprocessor_config.json").write_text(json.dumps(
        {**video, "video_processor_type": "Qwen2VLVideoProcessor"}, indent=2))
    return state


def write_qwen2_5_omni(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Qwen2.5-Omni-{3B,7B} download (thinker, talker, token2wav) at ``path``; returns its tensors by
    Hub name."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(omni_config(), indent=2))
    state = hub_names(_random_model(path, "Qwen2_5OmniForConditionalGeneration", seed), prefix="thinker.")
    state.pop("thinker.lm_head.weight", None)  # (tied, as in Omni-3B)
    write_shards(path, state, shards=3)
    write_tokenizer(path, OMNI_TOKENS, OMNI_TEMPLATE, named=OMNI_NAMED)
    tokens = json.loads((path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    (path / "added_tokens.json").write_text(json.dumps({v["content"]: int(k) for k, v in tokens.items()}, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": [t for t in OMNI_TOKENS[1:] if t not in _TAIL], "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}, indent=2))
    audio = {"chunk_length": 300, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
             "feature_size": 128, "hop_length": 160, "n_fft": 400, "n_samples": 4800000, "nb_max_frames": 30000,
             "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "sampling_rate": 16000}
    (path / "preprocessor_config.json").write_text(json.dumps(
        {**audio, **_image_processor("Qwen2_5OmniProcessor")}, indent=2, sort_keys=True))
    generator = torch.Generator().manual_seed(seed)
    speakers = {name: {"bos_token": bos, "cond": torch.randn(1, 16, generator=generator),
                       "ref_mel": torch.randn(1, 30, 80, generator=generator)}
                for name, bos in (("Chelsie", 8293), ("Ethan", 8294))}
    torch.save(speakers, path / "spk_dict.pt")
    return state
