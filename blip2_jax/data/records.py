"""Reading raw sources — annotation JSON in the LAVIS form, image files, webdataset shards —
into validated entries, and images into the bytes a dataset stores.

Annotation files are validated entirely before anything is written: a malformed file raises
`AnnotationError` naming the file and the entry. A missing or undecodable image is not an
annotation error: it becomes a `Skipped` record (counted and reported by the builder).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from typing import Any, Iterator, Optional, Sequence, Union

from PIL import Image, UnidentifiedImageError

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEPT_FORMATS = ("JPEG", "PNG")


class AnnotationError(ValueError):
    """A malformed annotation file or entry (the message names the file and the entry)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record left out of a dataset: `key` names it (file, shard:key), `reason` says why."""
    key: str
    reason: str


@dataclasses.dataclass(frozen=True)
class CaptionEntry:
    image: str                  # path relative to the image root
    captions: tuple[str, ...]
    image_id: str


@dataclasses.dataclass(frozen=True)
class VqaEntry:
    image: str
    question_id: str
    question: str
    answers: tuple[str, ...]
    image_id: str


# ------------------------------------------------------------------------------------------------
# Annotation files
# ------------------------------------------------------------------------------------------------
def read_json_records(path: str) -> list:
    """A JSON list (`.json`) or one object per line (`.jsonl`), with errors naming the place."""
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: annotation file does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}: line {n} is not valid JSON ({e.msg})") from e
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries (LAVIS form), got "
                              f"{type(data).__name__}")
    return data


def _field(path: str, i: int, entry: Any, name: str, kinds: tuple, required: bool = True):
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
    if name not in entry:
        if required:
            raise AnnotationError(f"{where}: missing {name!r} (keys: {sorted(entry)})")
        return None
    value = entry[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise AnnotationError(f"{where}: {name!r} must be {' or '.join(k.__name__ for k in kinds)}"
                              f", got {type(value).__name__} {value!r:.80}")
    return value


def _texts(path: str, i: int, entry: dict, name: str) -> tuple[str, ...]:
    value = _field(path, i, entry, name, (str, list))
    items = [value] if isinstance(value, str) else value
    if not items or not all(isinstance(t, str) and t.strip() for t in items):
        raise AnnotationError(f"{path}: entry {i}: {name!r} must be a non-empty string or a "
                              f"non-empty list of non-empty strings, got {value!r:.80}")
    return tuple(items)


def _image_fields(path: str, i: int, entry: dict) -> tuple[str, str]:
    image = _field(path, i, entry, "image", (str,))
    if not image.strip():
        raise AnnotationError(f"{path}: entry {i}: 'image' is empty")
    image_id = _field(path, i, entry, "image_id", (str, int), required=False)
    return image, str(image if image_id is None else image_id)


def caption_entries(path: str) -> list[CaptionEntry]:
    """LAVIS caption annotations: `[{"image": rel_path, "caption": str | [str], "image_id"?}]`."""
    out = []
    for i, entry in enumerate(read_json_records(path)):
        image, image_id = _image_fields(path, i, entry)
        out.append(CaptionEntry(image, _texts(path, i, entry, "caption"), image_id))
    if not out:
        raise AnnotationError(f"{path}: no entries")
    return out


def retrieval_entries(path: str) -> list[CaptionEntry]:
    """Caption annotations grouped per image (first-appearance order): one entry per image with
    all its captions, as LAVIS's `coco_karpathy_test.json` / `flickr30k_test.json` are."""
    grouped: dict[str, CaptionEntry] = {}
    for e in caption_entries(path):
        prev = grouped.get(e.image)
        if prev is not None and prev.image_id != e.image_id:
            raise AnnotationError(f"{path}: image {e.image!r} has two image ids, "
                                  f"{prev.image_id!r} and {e.image_id!r}")
        grouped[e.image] = CaptionEntry(e.image, (prev.captions if prev else ()) + e.captions,
                                        e.image_id)
    return list(grouped.values())


def vqa_entries(path: str) -> list[VqaEntry]:
    """LAVIS VQA annotations: `[{"question_id", "image", "question", "answer": str | [str]}]`
    (VQAv2 / OK-VQA lists, GQA single strings). A missing question_id becomes the entry index."""
    out = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(read_json_records(path)):
        image, image_id = _image_fields(path, i, entry)
        qid = _field(path, i, entry, "question_id", (str, int), required=False)
        qid = str(i if qid is None else qid)
        if qid in seen:
            raise AnnotationError(f"{path}: entry {i}: question_id {qid!r} repeats entry "
                                  f"{seen[qid]}")
        seen[qid] = i
        question = _texts(path, i, entry, "question")
        if len(question) != 1:
            raise AnnotationError(f"{path}: entry {i}: 'question' must be one string")
        out.append(VqaEntry(image, qid, question[0], _texts(path, i, entry, "answer"), image_id))
    if not out:
        raise AnnotationError(f"{path}: no entries")
    return out


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def image_bytes(data: bytes, max_size: Optional[int] = None) -> bytes:
    """Encoded image bytes as a dataset stores them: RGB JPEG/PNG kept byte for byte; anything
    else (grey, CMYK, palette, alpha, GIF, WebP...) converted to RGB and re-encoded as PNG; images
    longer than `max_size` on a side shrunk (bicubic) and re-encoded. Raises ValueError when the
    bytes do not decode completely (corrupt or truncated)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode, size = im.format, im.mode, im.size
            if min(size) == 0:
                raise ValueError(f"empty image {size[0]}x{size[1]}")
            shrink = max_size is not None and max(size) > max_size
            if fmt in _KEPT_FORMATS and mode == "RGB" and not shrink:
                return data
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from e
    if shrink:
        scale = max_size / max(size)
        rgb = rgb.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))),
                         Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(buf, "JPEG", quality=95)
    else:
        rgb.save(buf, "PNG")
    return buf.getvalue()


def read_image(root: str, rel: str, max_size: Optional[int] = None) -> Union[bytes, Skipped]:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        return Skipped(rel, "missing image file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return image_bytes(data, max_size)
    except ValueError as e:
        return Skipped(rel, str(e))


# ------------------------------------------------------------------------------------------------
# Webdataset shards
# ------------------------------------------------------------------------------------------------
def _split_key(name: str) -> tuple[str, str]:
    # webdataset convention: the key is the path up to the first "." of the base name.
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _caption_of(files: dict[str, bytes]) -> Optional[str]:
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace").strip() or None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        for k in ("caption", "text", "TEXT"):
            if isinstance(meta, dict) and isinstance(meta.get(k), str) and meta[k].strip():
                return meta[k].strip()
    return None


def webdataset_samples(shards: Sequence[str]) -> Iterator[Union[tuple[str, bytes, str], Skipped]]:
    """Stream (key, image bytes, caption) out of webdataset tar shards, one sample in memory at a
    time. Samples without an image or a caption, and the rest of a truncated or unreadable shard,
    come out as `Skipped`."""
    for shard in shards:
        current: Optional[str] = None
        files: dict[str, bytes] = {}

        def finish():
            key = f"{os.path.basename(shard)}:{current}"
            image_ext = next((e for e in _IMAGE_EXTS if e in files), None)
            caption = _caption_of(files)
            if image_ext is None:
                return Skipped(key, f"no image ({'/'.join(_IMAGE_EXTS)}) in sample")
            if caption is None:
                return Skipped(key, "no caption (.txt, or .json with 'caption'/'text')")
            return key, files[image_ext], caption

        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    if key != current and current is not None:
                        yield finish()
                        files = {}
                    current = key
                    files[ext] = tar.extractfile(member).read()
            if current is not None:
                yield finish()
        except (tarfile.TarError, EOFError, OSError) as e:
            where = f"after {current}" if current is not None else "at its start"
            yield Skipped(f"{os.path.basename(shard)}:{current or '<start>'}",
                          f"shard unreadable {where} ({type(e).__name__}: {e}); rest of the "
                          "shard skipped")
