"""Per-example image and text operations (LAVIS `blip_processors.py` semantics), numpy in/out.

Image ops take a decoded RGB PIL image and a `numpy.random.Generator` (the pipeline derives one
per example from the seed and the example's global position, so results do not depend on worker
or host counts):

    decode(bytes)                              → RGB PIL image (alpha dropped, as LAVIS)
    random_resized_crop(img, size, rng)        torchvision RandomResizedCrop(scale (0.5, 1),
                                               ratio (3/4, 4/3), bicubic)
    hflip(img, rng)                            RandomHorizontalFlip(0.5)
    rand_augment(img, rng)                     LAVIS RandomAugment(2, 5) (`blip_image_train`)
    resize(img, size)                          `blip_image_eval`: Resize((s, s), bicubic), no crop
    normalize(img)                             ToTensor + Normalize(OpenAI CLIP) → (S, S, 3) float32

`image_processor(name, size)` chains them as LAVIS's named processors do. Text ops are
`processing.pre_caption` / `pre_question` (LAVIS), re-exported here.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from blip2_jax.processing import normalize_pixels, pre_caption, pre_question

__all__ = ["decode", "random_resized_crop", "hflip", "rand_augment", "resize", "normalize",
           "image_processor", "IMAGE_PROCESSORS", "pre_caption", "pre_question"]

def decode(data: bytes) -> Image.Image:
    """Encoded bytes → RGB PIL image. Raises ValueError on corrupt or truncated data."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image does not decode ({type(e).__name__}: {e})") from e


def crop_box(width: int, height: int, rng: np.random.Generator,
             scale: tuple[float, float] = (0.5, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (left, top, w, h) covering `scale` of the area
    with aspect ratio in `ratio` (log-uniform); 10 tries, then a centre crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.5, 1.0)) -> Image.Image:
    left, top, w, h = crop_box(img.width, img.height, rng, scale)
    # PIL's resize with a box is crop-then-resize in one pass (torchvision's `resized_crop`).
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


def hflip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def resize(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.Resampling.BICUBIC)


def normalize(img: Image.Image) -> np.ndarray:
    """ToTensor (÷255) + Normalize(OpenAI CLIP mean/std), channels last, float32 — the same
    arithmetic as `processing.preprocess_images`."""
    return normalize_pixels(np.asarray(img))


# ------------------------------------------------------------------------------------------------
# LAVIS RandomAugment(N=2, M=5): N ops drawn with replacement from the list, each applied with
# probability 0.5 at magnitude M/10; geometric ops pick a random sign and fill with grey 128.
# LAVIS implements the ops with OpenCV on arrays; these are PIL's versions of the same ops.
# At M=5 LAVIS's Brightness and Sharpness factors are 5/10 * 1.8 + 0.1 = 1.0: no-ops, kept so.
# ------------------------------------------------------------------------------------------------
_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() < 0.5 else v


def _affine(img: Image.Image, coeffs) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs,
                         resample=Image.Resampling.NEAREST, fillcolor=_FILL)


_RAND_AUGMENT_OPS: dict[str, Callable] = {
    "Identity": lambda img, m, rng: img,
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(m * 1.8 + 0.1),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(m * 1.8 + 0.1),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(m * 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(m * 0.3, rng), 1, 0)),
    "TranslateX": lambda img, m, rng: _affine(img, (1, 0, _signed(m * 10, rng), 0, 1, 0)),
    "TranslateY": lambda img, m, rng: _affine(img, (1, 0, 0, 0, 1, _signed(m * 10, rng))),
    "Rotate": lambda img, m, rng: img.rotate(_signed(m * 30, rng), fillcolor=_FILL),
}


def rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 5, ops: tuple[str, ...] = tuple(_RAND_AUGMENT_OPS),
                 prob: float = 0.5) -> Image.Image:
    for name in rng.choice(list(ops), num_ops):
        if rng.random() < prob:
            img = _RAND_AUGMENT_OPS[str(name)](img, magnitude / _MAX_LEVEL, rng)
    return img


# ------------------------------------------------------------------------------------------------
# Named processors (LAVIS names)
# ------------------------------------------------------------------------------------------------
def _blip2_image_train(img, size, rng, flip=True):
    img = random_resized_crop(img, size, rng)
    return hflip(img, rng) if flip else img


def _blip_image_train(img, size, rng, flip=True):
    return rand_augment(_blip2_image_train(img, size, rng, flip), rng)


IMAGE_PROCESSORS = {
    "blip2_image_train": _blip2_image_train,   # crop + flip (COCO and the web data)
    "blip_image_train": _blip_image_train,     # + RandAugment (Visual Genome in LAVIS)
    "blip_image_eval": lambda img, size, rng, flip=True: resize(img, size),
}


def image_processor(name: str, size: int, flip: bool = True
                    ) -> Callable[[Image.Image, np.random.Generator], np.ndarray]:
    """`name` (a LAVIS processor name) at `size` px → fn(img, rng) → normalised float32 array.
    flip=False drops the horizontal flip (for captions that say "left" / "right")."""
    if name not in IMAGE_PROCESSORS:
        raise ValueError(f"image processor {name!r} is not one of {sorted(IMAGE_PROCESSORS)}")
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    op = IMAGE_PROCESSORS[name]
    return lambda img, rng: normalize(op(img, size, rng, flip))
