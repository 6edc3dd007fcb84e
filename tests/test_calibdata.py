"""Calibration data as users have it: FLAC / OGG / MP3 audio through soundfile and soxr, Hugging
Face datasets (save_to_disk, parquet, audiofolder, in memory), video through PyAV, and the
report of what was read."""

import json
import logging

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from masquant import CalibrationError, modality_ids
from masquant.io import media
from masquant.io.calibfile import Columns, read_calibration
from masquant.refmodels.processor import RefProcessor
from masquant.refmodels.registry import model_dir

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def omni():
    return RefProcessor.from_pretrained(model_dir("ref-omni"))


@pytest.fixture(scope="module")
def vl():
    return RefProcessor.from_pretrained(model_dir("ref-vl"))


def _speechlike(rate: int, seconds: float = 0.6, seed: int = 0) -> np.ndarray:
    """A stereo clip: a few harmonics with a wandering pitch and some noise, as 16-bit samples."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    pitch = 150 + 45 * seed + 40 * np.sin(2 * np.pi * 3 * t)  # (each seed its own voice)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    mono = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + 0.01 * rng.standard_normal(t.size)
    stereo = np.stack([mono, 0.8 * mono], 1)
    return np.round(stereo * 32767).astype(np.int16)  # (integers: every container stores the same samples)


def test_audio_files_of_every_format_decode_to_the_same_clip(tmp_path):
    """WAV and FLAC (lossless) decode to identical samples; OGG Vorbis to the same waveform within its
    coding error; MP3 (libsndfile's encoder keeps less of it) to the same clip's spectrum and level
    rather than another clip's; channels averaged, all at the processor's rate."""
    clip, other = _speechlike(22_050), _speechlike(22_050, seed=1)
    for name, fmt, subtype in (("a.wav", "WAV", "PCM_16"), ("a.flac", "FLAC", "PCM_16"), ("a.ogg", "OGG", "VORBIS"),
                               ("a.mp3", "MP3", "MPEG_LAYER_III")):
        soundfile.write(tmp_path / name, clip, 22_050, format=fmt, subtype=subtype)
    soundfile.write(tmp_path / "b.wav", other, 22_050, subtype="PCM_16")
    decoded = {name: media.audio(tmp_path / name, "t", 16_000) for name in ("a.wav", "a.flac", "a.ogg", "a.mp3",
                                                                            "b.wav")}
    assert np.array_equal(decoded["a.wav"], decoded["a.flac"])
    ref = decoded["a.wav"]
    assert ref.dtype == np.float32 and abs(ref.size - round(clip.shape[0] * 16_000 / 22_050)) <= 1
    assert np.corrcoef(ref, decoded["a.ogg"][:ref.size])[0, 1] > 0.99
    spectrum = lambda x: np.abs(np.fft.rfft(x[:9000]))  # noqa: E731
    mp3 = decoded["a.mp3"]
    same, different = (np.corrcoef(spectrum(mp3), spectrum(decoded[w]))[0, 1] for w in ("a.wav", "b.wav"))
    assert same > different + 0.2 and 0.75 < np.sqrt(np.mean(mp3**2) / np.mean(ref**2)) < 1.25


def test_resampling_is_band_limited():
    """A 10 kHz tone has no place at 16 kHz (Nyquist 8 kHz): the band-limited resampler removes it,
    where linear interpolation (the reader's former resampler) folds it back to 6 kHz."""
    rate = 44_100
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 10_000 * t)).astype(np.float32)
    out = media.audio({"array": tone, "sampling_rate": rate}, "t", 16_000)
    linear = np.interp(np.linspace(0, tone.size - 1, out.size), np.arange(tone.size), tone)
    energy = lambda x: float(np.mean(x[2000:-2000] ** 2))  # noqa: E731  (edges: the filter's ramp)
    assert energy(out) < 1e-3 * energy(tone) and energy(linear) > 0.1 * energy(tone)
    keep = (0.5 * np.sin(2 * np.pi * 3_000 * t)).astype(np.float32)  # below Nyquist: kept
    assert abs(energy(media.audio({"array": keep, "sampling_rate": rate}, "t", 16_000)) - energy(keep)) < \
        0.01 * energy(keep)


def test_bad_audio_names_the_file_and_what_is_wrong(tmp_path):
    (tmp_path / "junk.flac").write_bytes(b"fLaC but not really")
    with pytest.raises(CalibrationError, match=r"^row 4: cannot read audio .*junk\.flac"):
        media.audio(tmp_path / "junk.flac", "row 4", 16_000)
    with pytest.raises(CalibrationError, match="needs its 'sampling_rate'"):
        media.audio({"array": np.zeros(10)}, "row 1", 16_000)
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        media.audio({"array": np.array([0.0, np.nan]), "sampling_rate": 16_000}, "row 1", 16_000)


def _clips(root, fmt: str, n: int = 3) -> list[str]:
    names = []
    for i in range(n):
        name = f"clip{i}.{fmt.lower()}"
        soundfile.write(root / name, _speechlike(16_000, seed=i), 16_000, format=fmt, subtype="PCM_16")
        names.append(name)
    return names


def test_a_flac_audiofolder_gives_the_same_model_as_the_same_clips_in_wav(tmp_path, monkeypatch):
    """``masquant quantize --model ref-omni --calib <FLAC audiofolder>`` and the same clips as WAV in
    JSONL: the same samples, and a bit-identical saved model."""
    from safetensors.torch import load_file

    from masquant.cli.main import main

    flac, wav = tmp_path / "flac", tmp_path / "wav"
    flac.mkdir()
    wav.mkdir()
    texts = ["Which word is spoken?", "What do you hear?", "Say it again."]
    names = _clips(flac, "FLAC")
    rows = "".join(f"{n},{t}\n" for n, t in zip(names, texts, strict=True))
    (flac / "metadata.csv").write_text("file_name,text\n" + rows)
    wavs = _clips(wav, "WAV")
    lines = [json.dumps({"text": t, "audio": n}) for n, t in zip(wavs, texts, strict=True)]
    (wav / "calib.jsonl").write_text("\n".join(lines) + "\n")
    processor = RefProcessor.from_pretrained(model_dir("ref-omni"))
    a, b = read_calibration(flac, processor), read_calibration(wav / "calib.jsonl", processor)
    assert len(a) == len(b) == 3 and a.summary["with"]["audio"] == 3
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for src, out in ((flac, "q-flac"), (wav / "calib.jsonl", "q-wav")):
        assert main(["quantize", "--model", "ref-omni", "--calib", str(src), "--method", "smoothquant",
                     "--w-bits", "8", "--a-bits", "8", "--out", str(tmp_path / out), "--no-progress"]) == 0
    one, two = (load_file(tmp_path / out / "model.safetensors") for out in ("q-flac", "q-wav"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    report = json.loads((tmp_path / "q-flac" / "report.json").read_text())
    assert report["data"]["with"]["audio"] == 3 and report["data"]["source"] == str(flac)


def _image_rows(root, n: int = 6) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / f"im{i}.png")
        rows.append({"caption": [f"a picture number {i}", "another caption"], "image": f"im{i}.png",
                     "answer": "yes"})
    return rows


def test_saved_and_parquet_datasets_with_columns_sampling_and_truncation(tmp_path, vl, caplog):
    """A ``save_to_disk`` dataset of PIL images and a parquet file of image paths read alike: the
    caption column found by its name (a list: its first caption), --num-samples rows chosen by
    --shuffle-seed, the same rows from either source; --max-seq-len cuts text after the image."""
    rows = _image_rows(tmp_path)
    saved = datasets.Dataset.from_list([{**r, "image": Image.open(tmp_path / r["image"])} for r in rows])
    saved.save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    picked = [read_calibration(src, vl, num_samples=3, shuffle_seed=7)
              for src in (tmp_path / "saved", tmp_path / "rows.parquet")]
    assert [len(p) for p in picked] == [3, 3] and picked[0].summary["rows"] == 6
    for x, y in zip(*picked, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
    again = read_calibration(tmp_path / "rows.parquet", vl, num_samples=3, shuffle_seed=8)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(again, picked[1], strict=True))
    whole = read_calibration(tmp_path / "rows.parquet", vl)
    length = whole[0]["input_ids"].shape[1]
    short = read_calibration(tmp_path / "rows.parquet", vl, max_seq_len=length - 3)
    assert short.summary["truncated"] == 6 and short[0]["input_ids"].shape[1] == length - 3
    assert torch.equal(short[0]["input_ids"], whole[0]["input_ids"][:, :length - 3])
    with caplog.at_level(logging.WARNING, logger="masquant"):
        kept = read_calibration(tmp_path / "rows.parquet", vl, max_seq_len=5)  # inside the image: kept whole
    assert kept.summary["longer_kept_whole"] == 6 and kept[0]["input_ids"].shape[1] == length
    assert "kept whole" in caplog.text


def test_bad_rows_and_columns_name_the_row_and_column(tmp_path, vl):
    rows = _image_rows(tmp_path, 4)
    rows[2]["image"] = "missing.png"
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(CalibrationError, match=r"bad\.parquet: row 2: image file .*missing\.png does not exist"):
        read_calibration(tmp_path / "bad.parquet", vl)
    with pytest.raises(CalibrationError, match=r"no column 'picture' \(the image column\); columns: "):
        read_calibration(tmp_path / "bad.parquet", vl, columns=Columns(image="picture"))
    datasets.Dataset.from_list([{"image": "im0.png", "label": 1}]).to_parquet(str(tmp_path / "notext.parquet"))
    with pytest.raises(CalibrationError, match=r"no text column among .*--text-column"):
        read_calibration(tmp_path / "notext.parquet", vl)
    with pytest.raises(CalibrationError, match="row 1: 'prompt' must be a non-empty string"):
        read_calibration([{"prompt": "fine"}, {"prompt": ""}], vl)
    with pytest.raises(CalibrationError, match="num_samples must be at least 1"):
        read_calibration([{"prompt": "fine"}], vl, num_samples=0)


def test_chat_rows_take_their_images_from_the_image_column(tmp_path, vl):
    """Chat datasets keep images beside the messages: each image item without a source takes the
    next image of the row; the same sample as a JSONL chat line naming the file."""
    _image_rows(tmp_path, 1)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a picture"}]}]
    row = {"messages": chat, "images": [str(tmp_path / "im0.png")]}
    from_row = read_calibration(datasets.Dataset.from_list([row]), vl)[0]
    inline = [{**chat[0], "content": [{"type": "image", "image": "im0.png"}, chat[0]["content"][1]]}, chat[1]]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": inline}) + "\n")
    from_file = read_calibration(tmp_path / "chat.jsonl", vl)[0]
    assert all(torch.equal(from_row[k], from_file[k]) for k in from_file)
    with pytest.raises(CalibrationError, match=r"row 0: the row's media columns hold more"):
        read_calibration([{"messages": chat, "images": [str(tmp_path / "im0.png")] * 2}], vl)


def _video(path, frames: int = 13, fps: int = 6, size: int = 48):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.zeros((size, size, 3), np.uint8)
            image[:, : (i + 1) * size // frames] = (40 * i % 255, 200, 90)  # a bar that grows frame by frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_samples_go_through_the_model(tmp_path, vl):
    """A clip read by PyAV at the processor's 2 frames per second (an even count, the temporal
    patch), through ref-vl's processor and model: its tokens are vision tokens."""
    pytest.importorskip("av")
    _video(tmp_path / "clip.mp4")
    frames, rate = media.video(tmp_path / "clip.mp4", "t", fps=2.0, multiple=2)
    assert frames.shape[0] % 2 == 0 and frames.shape[0] >= 4 and frames.dtype == np.uint8 and 1.0 < rate < 3.0
    assert frames[-1, :, -1].mean() > frames[0, :, -1].mean()  # later frames: the bar has grown
    (tmp_path / "v.jsonl").write_text(json.dumps({"text": "What happens?", "video": "clip.mp4"}) + "\n")
    calib = read_calibration(tmp_path / "v.jsonl", vl)
    sample = calib[0]
    assert calib.summary["with"]["video"] == 1 and sample["video_grid_thw"][0, 0] == frames.shape[0] // 2
    from masquant.refmodels import registry

    model, _ = registry.load("ref-vl")
    assert set(modality_ids(model, sample["input_ids"]).unique().tolist()) == {0, 1}
    with torch.no_grad():
        assert torch.isfinite(model(**sample).logits).all()
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(CalibrationError, match=r"row 9: cannot read video .*junk\.mp4"):
        media.video(tmp_path / "junk.mp4", "row 9", 2.0)


def test_without_pyav_a_video_names_what_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "av" else real(name, *a, **k))
    with pytest.raises(CalibrationError, match=r"row 1: reading video needs PyAV.*pip install av"):
        media.video(tmp_path / "clip.mp4", "row 1", 2.0)


def test_the_report_states_what_was_read(tmp_path, omni, caplog):
    """The quantization report keeps the reader's summary, the tokens per modality and the
    modalities with fewer tokens than twice the layer width (warned about)."""
    import masquant
    from masquant.refmodels import registry

    names = _clips(tmp_path, "FLAC", 2)
    calib = read_calibration([{"text": "Listen.", "audio": str(tmp_path / n)} for n in names] + [{"text": "Hi."}],
                             omni)
    model, _ = registry.load("ref-omni")
    with caplog.at_level(logging.WARNING, logger="masquant"):
        report = masquant.quantize(model, calib, masquant.QuantConfig(method="rtn"), progress=False)
    assert report.data["with"] == {"image": 0, "audio": 2, "video": 0, "text only": 1}
    assert report.data["thin_modalities"] == ["audio"] and "only" in caplog.text and "audio calibration" in caplog.text
    assert report.tokens["audio"] < 2 * report.data["layer_width"]
    assert report.data_summary().startswith("calibration: 3 samples from 3 rows (2 audio, 1 text only); tokens ")
    assert masquant.QuantReport.from_dict(json.loads(report.to_json())).data == report.data
