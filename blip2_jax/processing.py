"""Pre- and post-processing: images → pixel values, text → token ids, token ids → text.

    from blip2_jax import processing as P
    pixels = P.preprocess_images([img, "photo.jpg"], 224)            # (B, 224, 224, 3) float32
    tok = P.load_tokenizer("path/to/blip2-opt-2.7b", "llm")   # OPT GPT-2 BPE / T5 spm / LLaMA
    ids, mask = P.tokenize_prompts(tok, ["Question: what is this? Answer:"], kind="opt")
    P.decode(tok, generated_ids, eos_token_id=50118)                  # ["a cat", ...]
    qtok = P.load_tokenizer("path/to/blip2-itm-vit-g", "qformer")     # BERT + [DEC] (30522)
    P.pre_caption("A man riding a WAVE!"), P.pre_question("What is it?")   # LAVIS text cleaning

Images (`preprocess_images`) match Hugging Face's PIL-backend `BlipImageProcessorPil` exactly (its
docstring measures the torchvision backend, HF v5's default when torchvision is installed: ±1-2
uint8 levels on <0.4 % of the values).
Tokenizers are `transformers` tokenizer objects loaded offline from a checkpoint directory; the
ids are assembled here (BOS/EOS/[CLS]/[SEP], truncation, padding) with HF's semantics, so they do
not depend on flags such as `add_bos_token` in a tokenizer_config.json.

Nothing here imports torch; `transformers` is imported only when a tokenizer is loaded.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union["Image.Image", np.ndarray, str, os.PathLike]

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "preprocess_images", "normalize_pixels", "load_tokenizer",
           "tokenizer_kind", "tokenize_prompts", "tokenize_prompt_answer", "decode", "pre_caption",
           "pre_question"]


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def _pil_to_rgb(image: Image.Image, alpha: str) -> np.ndarray:
    """HF `image_transforms.convert_to_rgb` for PIL images (alpha="white"), or PIL's plain
    `convert("RGB")`, which drops transparency (alpha="drop", LAVIS)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha and alpha == "white":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(image: np.ndarray, alpha: str) -> np.ndarray:
    """HF `convert_to_rgb` for uint8 channels-last arrays: grey is repeated, RGBA is blended onto
    white in float64 and rounded (alpha="white") or its alpha dropped (alpha="drop")."""
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        if alpha == "drop":
            return np.ascontiguousarray(image[..., :3])
        a = image[..., 3:4] / 255
        return np.round(a * image[..., :3] + (1 - a) * 255).astype(np.uint8)
    return image


def _load_path(path: str, exif_transpose: bool) -> Image.Image:
    # HF `image_utils.load_image`: open, apply the EXIF orientation, convert("RGB") (so a file's
    # alpha channel is dropped, not blended).
    with Image.open(path) as im:
        im.load()
        if exif_transpose:
            im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def _as_rgb_uint8(image: Any, where: str, alpha: str, exif_transpose: bool) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        where = f"{where} ({path!r})"
        if not os.path.isfile(path):
            raise ValueError(f"{where}: no such file")
        try:
            image = _load_path(path, exif_transpose)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{where}: cannot be read as an image ({type(e).__name__}: {e})") from e
    if isinstance(image, Image.Image):
        try:
            rgb = _pil_to_rgb(image, alpha)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: PIL image of mode {image.mode!r} cannot be converted to "
                             f"RGB ({type(e).__name__}: {e})") from e
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{where}: array dtype {image.dtype} is not supported; pass uint8 "
                             "pixels in [0, 255] (or a PIL image)")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
            raise ValueError(f"{where}: array shape {image.shape} is not an image; expected "
                             "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4), channels last")
        rgb = _array_to_rgb(image, alpha)
    else:
        raise ValueError(f"{where}: unsupported type {type(image).__name__}; expected a PIL image, "
                         "a uint8 numpy array or a file path")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{where}: empty image of size {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def preprocess_images(images: ImageLike | Sequence[ImageLike], image_size: int | tuple[int, int],
                      mean: Sequence[float] = OPENAI_CLIP_MEAN,
                      std: Sequence[float] = OPENAI_CLIP_STD, *, alpha: str = "white",
                      exif_transpose: bool = True) -> np.ndarray:
    """Images → normalised pixel values (B, H, W, 3) float32, channels last (our models' layout).

    Each image is converted to RGB, resized to (image_size, image_size) with PIL bicubic
    (`Image.resize(..., BICUBIC)`, no crop, aspect ratio not kept), rescaled by 1/255 (in
    float64, then cast to float32) and normalised as (x - mean) / std in float32.

    images: a list (or one) of PIL images (any mode PIL converts to RGB), uint8 arrays (H, W, 3),
        (H, W) / (H, W, 1) grey or (H, W, 4) RGBA, or image file paths. A 4-D uint8 array is taken
        as a batch (B, H, W, C).
    alpha: "white" (default) blends transparency onto white as HF's `convert_to_rgb` does;
        "drop" discards it as PIL's `convert("RGB")` and LAVIS's loaders do. File paths always
        drop it, as HF's `load_image` and LAVIS do.
    exif_transpose: file paths get their EXIF orientation applied, as HF's `load_image` does;
        LAVIS's datasets do not (False). PIL images and arrays are taken as they are.

    Parity: this is Hugging Face's `BlipImageProcessorPil` (transformers v5 `PilBackend`; what
    `AutoImageProcessor` / `Blip2Processor.from_pretrained` pick when torchvision is absent, or
    with `backend="pil"`), bit-for-bit (max abs difference 0 on skimage's astronaut, chelsea,
    coffee, rocket, camera (grey) and an RGBA image, see tests/test_processing.py), transposed
    from its (B, 3, H, W) to (B, H, W, 3). It is also LAVIS's `blip_image_eval` (torchvision
    `Resize` on a PIL image calls PIL's bicubic, then `ToTensor` and `Normalize`) up to float
    rounding, except for alpha blending and EXIF orientation as described above.

    HF v5's default `BlipImageProcessor` is the *torchvision backend* (`AutoImageProcessor` and
    `Blip2Processor.from_pretrained` pick it whenever torchvision is installed). It resizes the
    uint8 tensor with `torchvision.transforms.v2.functional.resize(BICUBIC, antialias=True)`,
    torchvision's own antialiased bicubic that approximates PIL's in integer arithmetic, and
    rescales/normalises in torch. Measured (transformers 5.24, torchvision 0.28, CPU) against this
    function at 224, 364 and 490 px on skimage's astronaut, chelsea, coffee, rocket, camera,
    hubble_deep_field and retina: 0.03-0.4 % of the values differ by one uint8 level (0.015 after
    normalisation), a few by two (max abs difference 0.030); mean abs difference 5e-6 to 6e-5;
    all other values agree to 2.4e-7. Pass `backend="pil"` to HF to get our exact numbers.
    """
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    if isinstance(image_size, (int, np.integer)):
        height = width = int(image_size)
    else:
        height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    mean32 = np.asarray(mean, np.float32).reshape(-1)
    std32 = np.asarray(std, np.float32).reshape(-1)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"mean and std need 3 values (R, G, B); got {mean!r} and {std!r}")

    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    elif isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    else:
        images = list(images)
    if not images:
        raise ValueError("preprocess_images needs at least one image; got an empty list")

    out = np.empty((len(images), height, width, 3), np.float32)
    for i, image in enumerate(images):
        rgb = _as_rgb_uint8(image, f"image {i}", alpha, exif_transpose)
        resized = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").resize(
            (width, height), resample=Image.Resampling.BICUBIC)
        out[i] = normalize_pixels(np.asarray(resized), mean32, std32)
    return out


def normalize_pixels(rgb: np.ndarray, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                     std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 RGB (..., 3) → float32 (x / 255 - mean) / std: the rescale in float64 then cast, and
    the normalisation in float32, as HF's image processors do (torchvision's ToTensor +
    Normalize agree up to float rounding). Computed once per (value, channel) and looked up."""
    table = _normalize_table(tuple(float(m) for m in np.ravel(mean)),
                             tuple(float(s) for s in np.ravel(std)))
    rgb = np.asarray(rgb, np.uint8)
    out = np.empty(rgb.shape, np.float32)
    for c in range(3):
        np.take(table[c], rgb[..., c], out=out[..., c])
    return out


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple, std: tuple) -> np.ndarray:
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
    table = (x[None, :] - mean32) / std32
    return np.ascontiguousarray(table)    # (3, 256): table[channel, value]


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------
class TokenizerError(ValueError):
    """Tokenizer files that cannot serve (unreadable, of another model, without a special token
    the model needs); the message names the file. Missing files are a FileNotFoundError."""


QFORMER_SUBDIR = "qformer_tokenizer"
DEC_TOKEN = "[DEC]"

# Special tokens of each family, used where tokenizer_config.json does not name them.
_OPT_SPECIALS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
                 "pad_token": "<pad>"}
_T5_SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _tokenizer_json_model(path: str) -> str:
    """The `model.type` of a tokenizers tokenizer.json: "BPE", "Unigram", "WordPiece"..."""
    model = _read_json(path).get("model") or {}
    return str(model.get("type", ""))


def _tokenizer_json_family(path: str) -> Optional[str]:
    """The LLM family of a tokenizer.json: "t5" (Unigram); for BPE, "llama" (SentencePiece BPE:
    byte fallback, "▁" for spaces) or "opt" (GPT-2 byte-level BPE); None for other models."""
    d = _read_json(path)
    model = d.get("model") or {}
    kind = model.get("type")
    if kind == "Unigram":
        return "t5"
    if kind != "BPE":
        return None
    spaces = json.dumps([d.get("pre_tokenizer"), d.get("normalizer")], ensure_ascii=False)
    return "llama" if model.get("byte_fallback") or "\u2581" in spaces else "opt"


def _missing_files_error(what: str, looked: list[str], present: list[str]) -> FileNotFoundError:
    missing = [p for p in looked if p not in present]
    return FileNotFoundError(
        f"no {what}. Looked for: {', '.join(looked)}. Missing: {', '.join(missing)}."
        + (f" Present: {', '.join(present)}." if present else ""))


def _find_llm_files(path: str, kind: str) -> tuple[str, str]:
    """(family, how) for the LLM tokenizer in `path`; family "opt", "t5" or "llama"."""
    j = lambda *names: [os.path.join(path, n) for n in names]  # noqa: E731
    tok_json, vocab_json, merges, spiece, sp_model, cfg = j(
        "tokenizer.json", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model",
        "tokenizer_config.json")
    looked = [tok_json, vocab_json, merges, spiece, sp_model]
    present = [p for p in looked + [cfg] if os.path.isfile(p)]
    want = {"llm": ("opt", "t5", "llama"), "opt": ("opt",), "t5": ("t5",),
            "llama": ("llama",)}[kind]
    found = []
    if os.path.isfile(tok_json):
        family = _tokenizer_json_family(tok_json)
        if family is None:
            model = _tokenizer_json_model(tok_json)
            raise TokenizerError(
                f"{tok_json} holds a {model or 'unknown'} tokenizer, not an LLM one (OPT: "
                "byte-level BPE, T5: SentencePiece Unigram, LLaMA: SentencePiece BPE)"
                + ("; a WordPiece tokenizer is the Q-Former's: use kind='qformer'"
                   if model == "WordPiece" else ""))
        found.append((family, "tokenizer.json"))
    if os.path.isfile(vocab_json) and os.path.isfile(merges):
        found.append(("opt", "vocab.json + merges.txt"))
    if os.path.isfile(spiece):
        found.append(("t5", "spiece.model"))
    if os.path.isfile(sp_model):
        found.append(("llama", "tokenizer.model"))
    for family, how in found:
        if family in want:
            return family, how
    if found:
        raise TokenizerError(f"{path} holds a {found[0][0]} tokenizer ({found[0][1]}), "
                             f"not {kind}")
    if kind == "opt":
        looked = [tok_json, vocab_json, merges]
    elif kind == "t5":
        looked = [tok_json, spiece]
    elif kind == "llama":
        looked = [tok_json, sp_model]
    what = {"llm": "LLM tokenizer (OPT: tokenizer.json or vocab.json + merges.txt; T5: "
                   "tokenizer.json or spiece.model; LLaMA: tokenizer.json or tokenizer.model)",
            "opt": "OPT tokenizer (tokenizer.json or vocab.json + merges.txt)",
            "t5": "T5 tokenizer (tokenizer.json or spiece.model)",
            "llama": "LLaMA tokenizer (tokenizer.json or tokenizer.model)"}[kind]
    raise _missing_files_error(f"{what} in {path}", looked, present)


def _special_defaults(path: str, defaults: dict) -> dict:
    """The family's special tokens that tokenizer_config.json (if any) does not set."""
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    return {k: v for k, v in defaults.items() if cfg.get(k) is None}


def _load_llm(path: str, kind: str):
    # start-up time: transformers takes seconds to import; only loading a tokenizer needs it
    import transformers

    family, how = _find_llm_files(path, kind)
    if family == "opt":
        tok = transformers.GPT2Tokenizer.from_pretrained(
            path, local_files_only=True, **_special_defaults(path, _OPT_SPECIALS))
    elif family == "llama":
        if how == "tokenizer.model":
            try:
                import sentencepiece  # noqa: F401 (optional dependency: converting tokenizer.model)
            except ImportError as e:
                raise ImportError(f"{path} has tokenizer.model but no tokenizer.json: converting "
                                  "it needs the `sentencepiece` package (pip install "
                                  "sentencepiece)") from e
        tok = transformers.LlamaTokenizer.from_pretrained(path, local_files_only=True)
    else:
        if how == "spiece.model":
            try:
                import sentencepiece  # noqa: F401 (optional dependency: converting spiece.model)
            except ImportError as e:
                raise ImportError(f"{path} has spiece.model but no tokenizer.json: converting it "
                                  "needs the `sentencepiece` package (pip install sentencepiece)"
                                  ) from e
        tok = transformers.T5Tokenizer.from_pretrained(
            path, local_files_only=True, **_special_defaults(path, _T5_SPECIALS))
    # LLaMA tokenizers often have no pad token: `tokenize_prompts` pads with EOS there.
    need = {"opt": ("bos_token_id", "pad_token_id"), "t5": ("eos_token_id", "pad_token_id"),
            "llama": ("bos_token_id", "eos_token_id")}[family]
    for attr in need:
        if getattr(tok, attr) is None:
            raise TokenizerError(f"the {family} tokenizer in {path} has no {attr[:-3]}")
    return tok


def _load_qformer(path: str):
    # start-up time: transformers takes seconds to import; only loading a tokenizer needs it
    import transformers

    looked, present = [], []
    for d in (os.path.join(path, QFORMER_SUBDIR), path):
        vocab, tok_json, cfg = (os.path.join(d, n) for n in
                                ("vocab.txt", "tokenizer.json", "tokenizer_config.json"))
        looked += [vocab, tok_json]
        present += [p for p in (vocab, tok_json, cfg) if os.path.isfile(p)]
        usable = os.path.isfile(vocab) or (os.path.isfile(tok_json)
                                           and _tokenizer_json_model(tok_json) == "WordPiece")
        if usable:
            break
    else:
        raise _missing_files_error(
            f"Q-Former (BERT WordPiece) tokenizer in {path} (vocab.txt, or a WordPiece "
            f"tokenizer.json, in {QFORMER_SUBDIR}/ or the directory itself)", looked, present)
    tok = transformers.BertTokenizer.from_pretrained(d, local_files_only=True)
    if tok.bos_token is None:
        # LAVIS `Blip2Base.init_tokenizer`: add_special_tokens({"bos_token": "[DEC]"}).
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.truncation_side = "right"
    for attr in ("cls_token_id", "sep_token_id", "pad_token_id"):
        if getattr(tok, attr) is None:
            raise TokenizerError(f"the Q-Former tokenizer in {d} has no {attr[:-3]}")
    return tok


def load_tokenizer(path: str | os.PathLike, kind: str):
    """A `transformers` tokenizer from a checkpoint directory, offline.

    kind="llm": the LLM's tokenizer from an HF BLIP-2 checkpoint dir: OPT (GPT-2 byte-level BPE
        from tokenizer.json or vocab.json + merges.txt; `GPT2Tokenizer`, BOS `</s>`, pad
        `<pad>` unless tokenizer_config.json says otherwise), FlanT5 (SentencePiece from
        tokenizer.json or spiece.model, the latter needing `sentencepiece`; `T5Tokenizer`) or
        LLaMA (SentencePiece BPE from tokenizer.json or tokenizer.model, the latter needing
        `sentencepiece`; `LlamaTokenizer`). "opt", "t5" or "llama" insist on that family.
    kind="qformer": the Q-Former's BERT WordPiece tokenizer (vocab.txt or tokenizer.json) from
        `path/qformer_tokenizer/` or else `path` itself, with `[DEC]` added as bos token if it
        has none (id 30522 for bert-base-uncased, as LAVIS).

    A directory without the needed files raises FileNotFoundError naming what was looked for
    and what is missing; files of the wrong kind raise TokenizerError (a ValueError).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if kind in ("llm", "opt", "t5", "llama"):
        return _load_llm(path, kind)
    if kind == "qformer":
        return _load_qformer(path)
    raise ValueError(f"kind must be 'llm', 'opt', 't5', 'llama' or 'qformer', got {kind!r}")


def tokenizer_kind(tokenizer) -> str:
    """"opt", "t5", "llama" or "qformer", from the tokenizer's model (byte-level BPE / Unigram /
    SentencePiece BPE with byte fallback / WordPiece)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = type(backend.model).__name__ if backend is not None else ""
    kind = {"BPE": "opt", "Unigram": "t5", "WordPiece": "qformer"}.get(model)
    if kind == "opt" and (getattr(backend.model, "byte_fallback", False)
                          or "Llama" in type(tokenizer).__name__):
        kind = "llama"
    if kind is None:
        name = type(tokenizer).__name__
        kind = ("t5" if "T5" in name else "qformer" if "Bert" in name
                else "opt" if "GPT2" in name else None)
    if kind is None:
        raise ValueError(f"cannot tell the family of {type(tokenizer).__name__}; pass kind=")
    return kind


_PADDING_SIDE = {"opt": "left", "llama": "left", "t5": "right", "qformer": "right"}


def tokenize_prompts(tokenizer, texts: str | Sequence[str], *, kind: str,
                     padding_side: Optional[str] = None, max_length: Optional[int] = None,
                     truncation: Optional[bool] = None, padding: str = "longest",
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Texts → (input_ids, attention_mask), int32 (B, T), text tokens only (no image tokens).

    kind="opt": `[BOS] text`, LEFT padded by default with the pad id (1) — HF's BLIP-2 processor
        minus the 32 `<image>` placeholders (our model prepends the queries itself) and LAVIS's
        `predict_answers`; LAVIS's training captions are right padded (padding_side="right").
    kind="llama": `[BOS] text`, LEFT padded (as HF's LlamaTokenizer) with the pad id, or EOS when
        the tokenizer has no pad token (the padded positions are masked out).
    kind="t5": `text </s>`, right padded (pad 0).
    kind="qformer": `[CLS] text [SEP]`, right padded (pad 0). Retrieval evaluation uses
        max_length=35, padding="max_length"; stage-1 training max_length=32, padding="max_length";
        ITM truncates at max_length=32 and pads to the longest.
    kind="llm": "opt", "t5" or "llama" from the tokenizer (`tokenizer_kind`).

    max_length: truncation limit including the special tokens (right truncation: text is cut, the
        BOS/EOS/[CLS]/[SEP] stay), as HF `truncation=True, max_length=...`; `truncation` defaults
        to True when max_length is given. padding: "longest" or "max_length" (to max_length, or
        longer for untruncated rows). Ids equal `tokenizer(texts, padding=..., truncation=...,
        max_length=..., padding_side=...)` of HF with the family's special-token template.
    """
    if kind == "llm":
        kind = tokenizer_kind(tokenizer)
        if kind == "qformer":
            raise ValueError("kind='llm' but the tokenizer is a BERT (Q-Former) tokenizer")
    if kind not in _PADDING_SIDE:
        raise ValueError(f"kind must be 'opt', 't5', 'llama', 'qformer' or 'llm', got {kind!r}")
    padding_side = padding_side or _PADDING_SIDE[kind]
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if truncation is None:
        truncation = max_length is not None
    if (truncation or padding == "max_length") and max_length is None:
        raise ValueError("truncation and padding='max_length' need max_length")
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")

    pad = tokenizer.pad_token_id
    if kind in ("opt", "llama"):
        head, tail = [tokenizer.bos_token_id], []
        if pad is None and kind == "llama":
            pad = tokenizer.eos_token_id
    elif kind == "t5":
        head, tail = [], [tokenizer.eos_token_id]
    else:
        head, tail = [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    if None in head or None in tail or pad is None:
        raise ValueError(f"the tokenizer lacks the special tokens a {kind} sequence needs")
    n_special = len(head) + len(tail)
    if truncation and max_length < n_special:
        raise ValueError(f"max_length={max_length} leaves no room for {n_special} special tokens")

    body = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = []
    for ids in body:
        if truncation:
            ids = ids[:max_length - n_special]
        rows.append(head + list(ids) + tail)
    length = max(len(r) for r in rows)
    if padding == "max_length":
        length = max(length, max_length)
    input_ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = r
        mask[i, sl] = 1
    return input_ids, mask


def tokenize_prompt_answer(tokenizer, prompt: str, answer: str, *, kind: str, max_length: int,
                           suffix: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One decoder-only answer-generation training row, `[BOS] prompt answer END`, right padded
    to `max_length`: (ids, mask, targets), int32 (max_length,). `targets` is 1 on the answer's
    tokens and END, the only positions the loss predicts (LAVIS InstructBLIP's
    `concat_text_input_output` + `input_part_targets_len`: the prompt is never a target).

    kind="opt": the answer is tokenized as " " + answer (the tokens it follows the prompt with in
        running text: GPT-2's pre-tokenizer splits before the space, so these equal the tokens
        of the whole "prompt answer"), END = `suffix`'s tokens (BLIP-2 OPT: "\\n", its EOS).
    kind="llama": the answer as SentencePiece tokenizes it alone (its "\u2581" word start), END =
        `suffix`'s tokens then the tokenizer's EOS (pad: the pad id, or EOS when there is none).
    The prompt's tokens are those `tokenize_prompts` gives at inference. A row longer than
    `max_length`: the answer keeps at most max_length - 2 - len(END) tokens (cut on the right;
    END stays), then the prompt keeps its LAST tokens (cut on the left, as LAVIS's
    `truncation_side="left"` for InstructBLIP's inputs: the template's end, which the answer
    follows, stays)."""
    if kind not in ("opt", "llama"):
        raise ValueError(f"tokenize_prompt_answer is for decoder-only LLMs ('opt', 'llama'), got "
                         f"{kind!r}")
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    if kind == "llama" and pad is None:
        pad = tokenizer.eos_token_id
    end = list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else []
    if kind == "llama":
        end.append(tokenizer.eos_token_id)
    if bos is None or pad is None or None in end:
        raise ValueError(f"the tokenizer lacks the special tokens a {kind} sequence needs")
    room = max_length - 2 - len(end)          # BOS and at least one prompt token stay
    if room < 1:
        raise ValueError(f"max_length={max_length} leaves no room for an answer")
    text = " " + answer if kind == "opt" else answer
    answer_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:room] + end
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    keep = max_length - 1 - len(answer_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - keep:] if len(prompt_ids) > keep else prompt_ids
    row = [bos] + prompt_ids + answer_ids
    ids = np.full((max_length,), pad, np.int32)
    mask = np.zeros((max_length,), np.int32)
    targets = np.zeros((max_length,), np.int32)
    ids[:len(row)] = row
    mask[:len(row)] = 1
    targets[len(row) - len(answer_ids):len(row)] = 1
    return ids, mask, targets


def decode(tokenizer, ids, eos_token_id: Optional[int | Iterable[int]] = None,
           pad_token_id: Optional[int] = None) -> list[str]:
    """Generated ids (B, T) → texts: each row cut before its first `eos_token_id` (one id or
    several), pad ids dropped (default: the tokenizer's), decoded with skip_special_tokens and
    stripped — LAVIS's `batch_decode(..., skip_special_tokens=True)` + `output_text.strip()`.

    BLIP-2 OPT stops at "\\n" (eos_token_id=50118 with the real OPT vocabulary), T5 at `</s>` (1).
    Pass generated tokens only: a prompt's BOS `</s>` (2) would match an OPT `</s>` eos.
    """
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"ids must be (B, T) token ids; got shape {arr.shape}")
    if eos_token_id is None:
        eos = set()
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = {int(eos_token_id)}
    else:
        eos = {int(e) for e in eos_token_id}
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    out = []
    for row in arr.tolist():
        for j, t in enumerate(row):
            if t in eos:
                row = row[:j]
                break
        row = [t for t in row if t != pad]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


# ------------------------------------------------------------------------------------------------
# LAVIS text processors (lavis/processors/blip_processors.py)
# ------------------------------------------------------------------------------------------------
_LAVIS_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def _first_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(text: str, max_words: int = 50) -> str:
    """LAVIS `BlipCaptionProcessor.pre_caption`: lowercase, each of . ! " ( ) * # : ; ~ → a space,
    runs of 2+ whitespace → one space, trailing newlines then surrounding spaces stripped, first
    `max_words` space-separated words kept. (LAVIS then prepends its `prompt`, if any.)"""
    text = _LAVIS_PUNCT.sub(" ", text.lower())
    text = _MULTI_SPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return _first_words(text, max_words)


def fill_template(template: str, text: str) -> str:
    """`template` with its one `{}` replaced by `text` (a VQA prompt: "Question: {} Answer:").
    A template without exactly one `{}` would drop or repeat the question: a ValueError."""
    if template.count("{}") != 1 or template.replace("{}", "").count("{") \
            or template.replace("{}", "").count("}"):
        raise ValueError(f"the template {template!r} must hold exactly one {{}} where the "
                         f"question goes (e.g. \"Question: {{}} Answer:\")")
    return template.replace("{}", text)


def pre_question(text: str, max_words: int = 50) -> str:
    """LAVIS `BlipQuestionProcessor.pre_question`: lowercase, the same punctuation deleted (not
    replaced), trailing spaces stripped, first `max_words` space-separated words kept. Whitespace
    runs and leading spaces are kept, as in LAVIS."""
    text = _LAVIS_PUNCT.sub("", text.lower()).rstrip(" ")
    return _first_words(text, max_words)
