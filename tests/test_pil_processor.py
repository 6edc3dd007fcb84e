"""Qwen checkpoints' processors without torchvision (``masquant.io.pil_processor``): a directory laid
out as a Qwen2.5-VL download, its images through the PIL image processor, videos refused. Where
torchvision is installed (the vLLM venv), the fallback gives what transformers' own processor gives."""

import importlib.util
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from masquant.io.hf import processor_of
from masquant.io.pil_processor import PilProcessor
from masquant.refmodels import registry

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# a chat template in Qwen's style (roles between <|im_start|> / <|im_end|>, a system turn first)
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
            "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
            "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this item?"}]}]


@pytest.fixture
def hub_dir(tmp_path):
    """The processor files of a Qwen2.5-VL download (tokenizer: the reference model's, which has
    Qwen's special tokens)."""
    ref = registry.model_dir("ref-vl")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ref / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl",
                                                      "architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    image = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
             "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136,
             "max_pixels": 12845056, "image_mean": MEAN, "image_std": STD, "do_convert_rgb": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image))
    video = {**image, "video_processor_type": "Qwen2VLVideoProcessor"}
    del video["image_processor_type"]
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    return tmp_path


def _image(height: int = 90, width: int = 130):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.skipif(HAS_TORCHVISION, reason="transformers' own processor loads where torchvision is installed")
def test_without_torchvision_a_qwen_checkpoint_processes_images_and_refuses_videos(hub_dir, tmp_path, caplog):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with caplog.at_level(logging.WARNING, logger="masquant"):
        processor = processor_of(hub_dir)
    assert isinstance(processor, PilProcessor) and "torchvision" in caplog.text
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")  # its own template
    out = processor([text], images=[_image()])
    expected = Qwen2VLImageProcessorPil.from_pretrained(hub_dir)(images=[_image()], return_tensors="pt")
    assert (out["pixel_values"] == expected["pixel_values"]).all()
    assert (out["image_grid_thw"] == expected["image_grid_thw"]).all()
    pads = int((out["input_ids"] == processor.image_pad).sum())
    assert pads == int(expected["image_grid_thw"].prod()) // 4 and int(out["mm_token_type_ids"].sum()) == pads
    with pytest.raises(ValueError, match="torchvision"):
        processor([text.replace("<|image_pad|>", "<|video_pad|>")], videos=[[_image(), _image()]])
    processor.save_pretrained(tmp_path / "saved")  # the download's files as they were: the same processor again
    assert not (tmp_path / "saved" / "masquant_processor.json").exists()
    again = processor_of(tmp_path / "saved")
    assert (again([text], images=[_image()])["input_ids"] == out["input_ids"]).all()


@pytest.mark.vllm  # (run in the vLLM venv's lane, which has torchvision)
@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision (the vLLM venv has it)")
def test_the_fallback_gives_what_the_qwen_processor_gives(hub_dir):
    """The same tokens, grids and marks; the same pixels where no resize is needed (PIL's bicubic
    and torchvision's differ by a grey level here and there when the image is resized)."""
    from transformers import AutoProcessor

    theirs = AutoProcessor.from_pretrained(hub_dir)
    ours = PilProcessor.from_pretrained(hub_dir)
    text = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == text
    a, b = ours([text], images=[_image()]), theirs(text=[text], images=[_image()], return_tensors="pt")
    assert (a["input_ids"] == b["input_ids"]).all() and (a["image_grid_thw"] == b["image_grid_thw"]).all()
    assert (a["mm_token_type_ids"] == b["mm_token_type_ids"]).all()
    diff = (a["pixel_values"] - b["pixel_values"]).abs()
    assert float(diff.mean()) < 1e-2 and float((diff > 0.1).float().mean()) < 0.01  # (< 1 grey level on average)
    aligned = _image(112, 140)  # (multiples of 28 pixels: no resize)
    a, b = ours([text], images=[aligned]), theirs(text=[text], images=[aligned], return_tensors="pt")
    assert (a["input_ids"] == b["input_ids"]).all()
    assert float((a["pixel_values"] - b["pixel_values"]).abs().max()) < 1e-5


@pytest.mark.skipif(HAS_TORCHVISION, reason="transformers' own processor loads where torchvision is installed")
def test_without_torchvision_an_omni_checkpoint_keeps_its_feature_extractor(hub_dir):
    """A Qwen2.5-Omni download's processor: its own Whisper settings (128 mel bins, as the released
    models have), no Qwen2.5-VL token types."""
    from transformers import WhisperFeatureExtractor

    from masquant.refmodels.processor import audio_tokens

    (hub_dir / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni"}))
    pre = json.loads((hub_dir / "preprocessor_config.json").read_text())
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000).to_dict()
    (hub_dir / "preprocessor_config.json").write_text(json.dumps({**features, **pre,
                                                                  "processor_class": "Qwen2_5OmniProcessor"}))
    processor = processor_of(hub_dir)
    assert isinstance(processor, PilProcessor) and processor.family == "omni"
    clip = np.sin(np.arange(16000 * 3 // 2) / 7.0).astype(np.float32)
    out = processor(["<|audio_start|><|AUDIO|><|audio_end|>hi"], audio=[clip])
    assert out["input_features"].shape[1] == 128 and "mm_token_type_ids" not in out
    audio = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert int((out["input_ids"] == audio).sum()) == audio_tokens(int(out["feature_attention_mask"].sum()))
