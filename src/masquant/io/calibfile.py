"""Calibration data as users have it, turned into model inputs by the model's own processor and
chat template:

* a JSONL file, one sample per line, either ``{"text": "...", "image": "a.png" | [...], "audio":
  "a.flac" | [...], "video": "clip.mp4" | [...], "answer": "..."}`` (media before the text in the
  user turn; ``answer``, optional, is the assistant turn, MBQ's answer tokens) or ``{"messages":
  [...]}`` in the Hugging Face chat format with ``{"type": "image" | "audio" | "video", ...}`` items;
  paths are relative to the file, errors name file:line;
* a Hugging Face dataset: a ``save_to_disk`` directory, parquet / JSON / CSV files, an
  ``imagefolder`` / ``audiofolder`` directory, a ``datasets.Dataset``, or any iterable of row
  dicts; columns found by their common names or named (``Columns``); errors name the row and column.

Media are decoded by ``masquant.io.media`` (Pillow, soundfile + soxr, PyAV). ``num_samples``,
``shuffle_seed`` and ``max_seq_len`` select and bound the samples; the returned
``CalibrationSet`` says what was read (``summary``), which the quantization report keeps.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from ..calibration.quantize import CalibrationError
from . import media

log = logging.getLogger("masquant")

FIELDS = {"text", "image", "audio", "video", "answer", "messages"}
MEDIA = ("image", "audio", "video")
NAMES = {  # role -> column names tried in turn when the column is not named
    "messages": ("messages", "conversations"),
    "text": ("text", "question", "prompt", "caption", "captions", "sentence", "instruction", "query",
             "transcription"),
    "image": ("image", "images", "img", "image_path", "picture"),
    "audio": ("audio", "speech", "audio_path", "sound"),
    "video": ("video", "videos", "video_path", "clip"),
    "answer": ("answer", "answers", "response", "output", "target"),
}
DATA_FILES = {".parquet": "parquet", ".json": "json", ".csv": "csv", ".tsv": "csv"}
IMAGE_FILES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_FILES = {".wav", ".flac", ".ogg", ".mp3", ".opus"}
PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|AUDIO|>", "<|audio_pad|>")  # media tokens never cut


@dataclass(frozen=True)
class Columns:
    """Which column holds each part of a sample (None: the first of ``NAMES`` present)."""

    text: str | None = None
    image: str | None = None
    audio: str | None = None
    video: str | None = None
    answer: str | None = None
    messages: str | None = None


class CalibrationSet(list):
    """The samples (model inputs), with ``summary``: where they came from, how many rows were
    read, samples with each medium, and truncations."""

    summary: dict


def read_calibration(source, processor, columns: Columns | None = None, num_samples: int | None = None,
                     shuffle_seed: int | None = None, max_seq_len: int | None = None,
                     sample_rate: int | None = None) -> CalibrationSet:
    """Model inputs, one dict per sample, from a calibration ``source`` (see the module docstring)."""
    columns = columns or Columns()
    if num_samples is not None and num_samples < 1:
        raise CalibrationError(f"num_samples must be at least 1, got {num_samples}")
    if max_seq_len is not None and max_seq_len < 1:
        raise CalibrationError(f"max_seq_len must be at least 1, got {max_seq_len}")
    rate = sample_rate or getattr(getattr(processor, "feature_extractor", None), "sampling_rate", None) or 16_000
    rows, label, total = _rows(source, columns, num_samples, shuffle_seed)
    out, counts = CalibrationSet(), {"image": 0, "audio": 0, "video": 0, "text only": 0}
    cut = kept_long = 0
    for where, row, roles, root in rows:
        messages, items = _parse(row, roles, where, root)
        sample = _encode(processor, messages, items, where, rate)
        for kind in MEDIA:
            counts[kind] += any(k == kind for k, _ in items)
        counts["text only"] += not items
        if max_seq_len is not None and sample["input_ids"].shape[-1] > max_seq_len:
            if _truncate(sample, max_seq_len, processor):
                cut += 1
            else:
                kept_long += 1
        out.append(sample)
    if not out:
        raise CalibrationError(f"calibration source {label} holds no samples")
    out.summary = {"source": label, "rows": total, "samples": len(out), "with": counts, "max_seq_len": max_seq_len,
                   "truncated": cut, "longer_kept_whole": kept_long}
    if kept_long:
        log.warning("%d calibration samples are longer than max_seq_len=%d but were kept whole: their media "
                    "tokens run past it (a cut would split an image, clip or video)", kept_long, max_seq_len)
    log.info("read %d calibration samples from %s (%s%s)", len(out), label,
             ", ".join(f"{n} {k}" for k, n in counts.items() if n), f"; {cut} truncated to {max_seq_len} tokens"
             if cut else "")
    return out


def _rows(source, columns: Columns, num_samples: int | None, seed: int | None):
    """(rows as (where, row, roles, root), a label of the source, rows in the source)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration source {path} does not exist")
        if path.is_file() and path.suffix == ".jsonl":
            rows = list(_jsonl(path, columns))
            return _pick(rows, num_samples, seed), str(path), len(rows)
        if path.is_dir() and _media_folder(path):
            rows = [(w, r, _roles(r.keys(), columns, w), root) for w, r, root in _folder(path)]
            return _pick(rows, num_samples, seed), str(path), len(rows)
        dataset, root = _open_dataset(path), path if path.is_dir() else path.parent
        label = str(path)
    elif _is_dataset(source):
        dataset, root, label = source, Path("."), f"a datasets.{type(source).__name__}"
    elif isinstance(source, Iterable) and not isinstance(source, (dict, bytes)):
        rows = [(f"row {i}", row, _roles(row.keys() if isinstance(row, dict) else (), columns, f"row {i}"),
                 Path(".")) for i, row in enumerate(source)]
        return _pick(rows, num_samples, seed), f"{len(rows)} rows", len(rows)
    else:
        raise CalibrationError(f"cannot read calibration data from a {type(source).__name__}: give a JSONL file, "
                               "a dataset directory or file, a datasets.Dataset or a list of row dicts")
    total = len(dataset)
    roles = _roles(dataset.column_names, columns, label)
    order = _pick(list(range(total)), num_samples, seed)  # (the same selection as for JSONL and lists)
    dataset = _undecoded(dataset, roles).select(order)
    return ((f"{label}: row {i}", row, roles, root) for i, row in zip(order, dataset, strict=True)), label, total


def _media_folder(path: Path) -> bool:
    """Whether ``path`` is laid out as an imagefolder / audiofolder: media files (and a metadata file)."""
    return any(p.suffix.lower() in IMAGE_FILES | AUDIO_FILES for p in path.rglob("*") if p.is_file())


def _folder(path: Path) -> Iterator[tuple[str, dict, Path]]:
    """The rows of an imagefolder / audiofolder as ``datasets`` lays them out: ``metadata.csv`` or
    ``metadata.jsonl`` with a ``file_name`` column and the other columns (read here: datasets'
    own builder needs torchcodec for audio)."""
    import csv

    metas = sorted(p for p in path.rglob("metadata.*") if p.suffix in (".csv", ".jsonl"))
    if not metas:
        raise CalibrationError(f"{path} holds media files but no metadata.csv / metadata.jsonl with their text "
                               "(a file_name column, and a text column)")
    for meta in metas:
        with meta.open(encoding="utf-8", newline="") as handle:
            records = csv.DictReader(handle) if meta.suffix == ".csv" else (json.loads(x) for x in handle if x.strip())
            for number, record in enumerate(records, 2 if meta.suffix == ".csv" else 1):
                where = f"{meta}:{number}"
                name = record.pop("file_name", None) if isinstance(record, dict) else None
                if not name:
                    raise CalibrationError(f"{where}: no file_name (the media file this row describes)")
                suffix = Path(name).suffix.lower()
                kind = "image" if suffix in IMAGE_FILES else "audio" if suffix in AUDIO_FILES else "video"
                yield where, {**record, kind: name}, meta.parent


def _pick(rows: list, num_samples: int | None, seed: int | None) -> list:
    if seed is not None:
        rows = rows[:]
        random.Random(seed).shuffle(rows)
    return rows if num_samples is None else rows[:num_samples]


def _jsonl(path: Path, columns: Columns) -> Iterator[tuple]:
    named = {getattr(columns, f.name) for f in fields(Columns)} - {None}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise CalibrationError(f"{where}: expected a JSON object, got {type(record).__name__}")
            unknown = sorted(set(record) - FIELDS - named)
            if unknown:
                raise CalibrationError(f"{where}: unknown field(s) {unknown}; use text, image, audio, video, answer "
                                       "or messages")
            yield where, record, _roles(record.keys(), columns, where, strict=False), path.parent


def _roles(names: Iterable[str], columns: Columns, where: str, strict: bool = True) -> dict[str, str]:
    """role -> column for the columns present; a named column that is absent is an error."""
    names, roles = list(names), {}
    for role in NAMES:
        given = getattr(columns, role)
        if given is not None:
            if given not in names:
                raise CalibrationError(f"{where}: no column {given!r} (the {role} column); columns: {names}")
            roles[role] = given
        else:
            found = next((n for n in NAMES[role] if n in names), None)
            if found is not None:
                roles[role] = found
    if strict and "messages" not in roles and "text" not in roles:
        raise CalibrationError(f"{where}: no text column among {names}: name it with --text-column "
                               "(or text_column=...), or give a 'messages' column")
    return roles


def _is_dataset(obj) -> bool:
    """A ``datasets.Dataset`` (an ``IterableDataset``, without a length, is read as rows)."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names") and hasattr(obj, "__len__")


def _open_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"reading {path} needs the `datasets` library: pip install datasets (or "
                               "masquant[data]); JSONL files need nothing more") from None
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json")):
            data = datasets.load_from_disk(str(path))
        elif path.is_file():
            if path.suffix not in DATA_FILES:
                raise CalibrationError(f"cannot read calibration file {path}: use .jsonl, .parquet, .json or .csv")
            data = datasets.load_dataset(DATA_FILES[path.suffix], data_files=str(path), split="train")
        else:
            suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
            kind = next((k for k in ("parquet", "json", "csv") if f".{k}" in suffixes), None)
            if kind is None:
                raise CalibrationError(f"{path} is not a dataset: no save_to_disk files, data files or media in it")
            data = datasets.load_dataset(kind, data_dir=str(path), split="train")
    except CalibrationError:
        raise
    except Exception as err:
        cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
        raise CalibrationError(f"cannot read the dataset at {path}: {type(err).__name__}: {err}{cause}") from None
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        log.info("%s holds splits %s; calibrating on %r", path, list(data), split)
        data = data[split]
    return data


def _undecoded(dataset, roles: dict[str, str]):
    """Media columns as their bytes or paths: masquant decodes them (the same decoders as for files)."""
    import datasets

    for role in MEDIA:
        column = roles.get(role)
        feature = dataset.features.get(column) if column else None
        kind = {"image": datasets.Image, "audio": datasets.Audio, "video": getattr(datasets, "Video", None)}[role]
        if kind is not None and isinstance(feature, kind) and feature.decode:
            dataset = dataset.cast_column(column, kind(decode=False))
    return dataset


def _parse(row: object, roles: dict[str, str] | None, where: str, root: Path) -> tuple[list[dict], list]:
    """(chat messages, [(kind, source)]) of one row. A chat's media items without a source of their
    own take, in order, those of the row's media columns (as chat datasets keep their images)."""
    if not isinstance(row, dict):
        raise CalibrationError(f"{where}: expected a dict of columns, got {type(row).__name__}")
    roles = roles or {}
    columns = {kind: _sources(row.get(roles.get(kind)), kind, where, root) for kind in MEDIA}
    if row.get(roles.get("messages")) is not None:
        if any(row.get(roles.get(r)) is not None for r in ("text", "answer")):
            raise CalibrationError(f"{where}: 'messages' cannot be combined with text or answer")
        return _chat(row[roles["messages"]], where, root, columns)
    text = row.get(roles["text"]) if "text" in roles else None
    text = text[0] if isinstance(text, list) and text else text
    if not isinstance(text, str) or not text.strip():
        raise CalibrationError(f"{where}: '{roles.get('text', 'text')}' must be a non-empty string")
    items = [(kind, s) for kind in MEDIA for s in columns[kind]]
    content = [{"type": kind} for kind, _ in items] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    answer = row.get(roles["answer"]) if "answer" in roles else None
    answer = answer[0] if isinstance(answer, list) and answer and isinstance(answer[0], str) else answer
    if answer is not None:
        if not isinstance(answer, str):
            raise CalibrationError(f"{where}: '{roles['answer']}' must be a string")
        messages.append({"role": "assistant", "content": answer})
    return messages, items


def _chat(messages: object, where: str, root: Path, columns: dict[str, list]) -> tuple[list[dict], list]:
    if not isinstance(messages, list) or not messages:
        raise CalibrationError(f"{where}: 'messages' must be a non-empty list of chat turns")
    items, out, pending = [], [], {kind: list(sources) for kind, sources in columns.items()}
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise CalibrationError(f"{where}: every chat turn needs 'role' and 'content'")
        content = turn["content"]
        if isinstance(content, list):
            parts = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in MEDIA:
                    own = _sources(item.get(kind), kind, where, root)
                    if not own and not pending[kind]:
                        raise CalibrationError(f"{where}: a chat item of type {kind} names no {kind} (and the row "
                                               f"has no {kind} column left to take it from)")
                    own = own or [pending[kind].pop(0)]
                    items += [(kind, s) for s in own]
                    parts += [{"type": kind}] * len(own)
                elif kind == "text":
                    parts.append({"type": "text", "text": item.get("text", "")})
                else:
                    raise CalibrationError(f"{where}: content items must have type text, image, audio or video")
            content = parts
        out.append({"role": turn["role"], "content": content})
    left = {kind: len(v) for kind, v in pending.items() if v}
    if left:
        raise CalibrationError(f"{where}: the row's media columns hold more than its chat items use ({left} left); "
                               "add an item per image / clip / video, or drop the extra ones")
    return out, items


def _sources(value: object, kind: str, where: str, root: Path) -> list:
    """The media sources of a cell: paths (relative to ``root``), ``{"bytes", "path"}`` dicts,
    audio ``{"array", "sampling_rate"}`` dicts, arrays or images."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, str) and v:
            path = root / v
            if not path.is_file():
                raise CalibrationError(f"{where}: {kind} file {path} does not exist")
            out.append(path)
        elif isinstance(v, dict) or (v is not None and not isinstance(v, (str, bool, int, float, list))):
            out.append(v)
        else:
            raise CalibrationError(f"{where}: '{kind}' must be a file path or a list of paths")
    return out


def _encode(processor, messages: list[dict], items: list, where: str, rate: int) -> dict:
    decoded: dict[str, list] = {"images": [], "audio": [], "videos": []}
    fps = []
    for kind, source in items:
        if kind == "image":
            decoded["images"].append(media.image(source, where))
        elif kind == "audio":
            decoded["audio"].append(media.audio(source, where, rate))
        else:
            frames, sampled = media.video(source, where, _video_fps(processor), _temporal_patch(processor))
            decoded["videos"].append(frames)
            fps.append(sampled)
    kwargs = {k: v for k, v in decoded.items() if v}
    if fps:
        kwargs["fps"] = fps
    try:
        text = processor.apply_chat_template(messages)
        return dict(processor(text=[text], return_tensors="pt", **kwargs))
    except Exception as err:
        raise CalibrationError(f"{where}: the processor rejected this sample: {err}") from err


def _video_fps(processor) -> float:
    return float(getattr(getattr(processor, "video_processor", None), "fps", None) or 2.0)


def _temporal_patch(processor) -> int:
    for part in ("video_processor", "image_processor"):
        size = getattr(getattr(processor, part, None), "temporal_patch_size", None)
        if size:
            return int(size)
    return 1


def _truncate(sample: dict, length: int, processor) -> bool:
    """Cut a one-row sample's sequence tensors to ``length`` tokens, unless a media placeholder
    lies at or past the cut (returns whether it cut)."""
    ids = sample["input_ids"]
    tokenizer = getattr(processor, "tokenizer", processor)
    special = [t for t in (tokenizer.convert_tokens_to_ids(p) for p in PLACEHOLDERS)
               if isinstance(t, int) and t != getattr(tokenizer, "unk_token_id", None)]
    tail = ids[..., length:]
    if any(bool((tail == t).any()) for t in special):
        return False
    for key, value in list(sample.items()):  # input_ids, attention_mask, mm_token_type_ids: [1, tokens]
        if getattr(value, "shape", None) == ids.shape:
            sample[key] = value[:, :length]
    return True
