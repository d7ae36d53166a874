"""A second image-text dataset, independent of the built-in one, to check that the demo recipe
learns on data it was not tuned to.

    python bench/second_dataset.py --out DIR [--train 3000 --test 100 --seed 0]
    python -m blip2_jax.demo --annotations train=DIR/captions_train.json \\
        test=DIR/captions_test.json --vqa train=DIR/vqa_train.json test=DIR/vqa_test.json \\
        --image-root DIR/images --work out/demo_second

`blip2_jax/data/synthetic.py` draws solid shapes (circle, square, ...) in six colours and two sizes
in the cells of a 3x3 grid over a noisy dark background. This dataset has other concepts, none
of those colour, shape or size words ("left" and "right" are its only words for a place that are
also synthetic's), and its own renderer:

- the background is one of six colours (`BACKGROUNDS`: pink, teal, brown, gray, navy, olive),
  lit by a soft linear gradient of random direction, with pixel noise;
- one or two rectangular patches (even odds) fill, with random margins, one half of the image:
  a single patch the upper, lower, left or right half; a pair the upper and lower halves or the
  left and right halves (`REGIONS`);
- each patch has a pattern (`PATTERNS`: plain, dotted, checkered, ringed, horizontally striped,
  vertically striped; periods and phases jittered) drawn in an ink (`INKS`: black, orange, cyan,
  lime, violet, ivory) over the background, inside a frame of the same ink (a plain patch is
  solid ink). Patterns are computed as numpy masks at 96x96 px; their cells (7-12 px) stay
  readable after the demo's resize to 72 px.

Captions name the background and every patch's pattern, ink and half, patches in a fixed order
(upper before lower, left before right). Each image has five captions: one from each of the five
templates in `CAPTION_TEMPLATES`, in a random order. That is every wording the dataset uses, so a
generated caption is right iff it equals one of its image's references (after lower-casing and
stripping punctuation; captions hold none). Captions are at most 23 words long.

Each image has three questions of different kinds, drawn from those that apply (`QUESTION_KINDS`,
`ANSWERS` lists each kind's answers; `question_kind` tells a question's kind), with ten identical
answers each, as VQAv2 lists them.

Deterministic for `--seed`: the same arguments write the same bytes. Every image is drawn from
its own random stream, seeded by (this dataset's tag, seed, split, image number), so the train
and test splits come from disjoint streams and image i of a split does not depend on how many
images are asked for. Test scenes are distinct in content (retrieval ground truth must be
unambiguous) and come from a part of scene space the train split never draws from
(`is_held_out`: one scene content in 10, by a fixed hash of `Scene.describe`), so a model is
tested on contents it never saw, not only on new renderings; train scenes can repeat.

Writes DIR/images/{split}_{i:06d}.png (RGB, 96x96), DIR/captions_{train,test}.json (LAVIS caption
form, one entry per image with its five captions: a retrieval split as
`records.retrieval_entries` and `builders.retrieval_truth` read it) and DIR/vqa_{train,test}.json
(LAVIS VQA form, with an extra "question_type" field naming the kind).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import zlib
from typing import Iterator, Optional

import numpy as np
from PIL import Image

IMAGE_SIZE = 96
BACKGROUNDS = {"pink": (200, 90, 140), "teal": (22, 128, 128), "brown": (135, 84, 44),
               "gray": (124, 124, 124), "navy": (40, 52, 132), "olive": (122, 122, 36)}
INKS = {"black": (12, 12, 12), "orange": (255, 146, 20), "cyan": (70, 232, 255),
        "lime": (172, 255, 72), "violet": (196, 146, 255), "ivory": (250, 244, 212)}
PATTERNS = ("plain", "dotted", "checkered", "ringed", "horizontally striped",
            "vertically striped")
# Each half as (x0, y0, x1, y1) in fractions of the image side.
REGIONS = {"upper half": (0.0, 0.0, 1.0, 0.5), "lower half": (0.0, 0.5, 1.0, 1.0),
           "left half": (0.0, 0.0, 0.5, 1.0), "right half": (0.5, 0.0, 1.0, 1.0)}
ONE_PATCH_LAYOUTS = (("upper half",), ("lower half",), ("left half",), ("right half",))
TWO_PATCH_LAYOUTS = (("upper half", "lower half"), ("left half", "right half"))

CAPTION_TEMPLATES = ("{patches} on a {background} background",
                     "a {background} background with {patches}",
                     "{patches} on {background}",
                     "{background} behind {patches}",
                     "a {background} backdrop with {patches}")

QUESTION_KINDS = ("count", "background", "color", "pattern", "exists", "where")
ANSWERS = {"count": ("1", "2"), "background": tuple(BACKGROUNDS), "color": tuple(INKS),
           "pattern": PATTERNS, "exists": ("yes", "no"), "where": tuple(REGIONS)}
# (question start, kind), the longer start first where one starts another.
_QUESTION_STARTS = (("how many patches", "count"), ("what color is the background", "background"),
                    ("what color is the patch", "color"), ("what pattern", "pattern"),
                    ("is there a", "exists"), ("where is the", "where"))

SPLIT_CODES = {"train": 0, "test": 1}
# First word of every random stream's seed: keeps these streams apart from any other use of
# (seed, split) seeds in the project.
_STREAM_TAG = 0x5EC0_0D05

# Patch margins inside their half, in px at 96 px (independently per side).
_MARGIN = (3, 8)
_FRAME = 2
# Pixel noise (standard deviation, in 0-255 units).
_NOISE = 3.0


@dataclasses.dataclass(frozen=True)
class Patch:
    region: str
    pattern: str
    ink: str

    def noun(self) -> str:
        return f"{self.pattern} {self.ink} patch"


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    patches: tuple  # tuple[Patch, ...], in the layout's order

    def describe(self) -> str:
        """The scene's content: equal iff two scenes have the same captions."""
        return self.background + ": " + "; ".join(f"{p.noun()} @ {p.region}"
                                                   for p in self.patches)


def is_held_out(scene: Scene) -> bool:
    """Whether the scene's content belongs to the test split (one in 10, by a fixed hash)."""
    return zlib.crc32(scene.describe().encode()) % 10 == 0


def sample_scene(rng: np.random.Generator) -> Scene:
    layouts = TWO_PATCH_LAYOUTS if rng.random() < 0.5 else ONE_PATCH_LAYOUTS
    layout = layouts[rng.integers(len(layouts))]
    patches = tuple(Patch(region, PATTERNS[rng.integers(len(PATTERNS))],
                          list(INKS)[rng.integers(len(INKS))]) for region in layout)
    return Scene(list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], patches)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _pattern_mask(pattern: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Where the ink goes in an (h, w) patch: the pattern, jittered in period and phase, and a
    frame (a plain patch is all ink)."""
    v, u = np.mgrid[0:h, 0:w]
    if pattern == "plain":
        return np.ones((h, w), bool)
    if pattern in ("horizontally striped", "vertically striped"):
        period = int(rng.integers(10, 13))
        coord = v if pattern == "horizontally striped" else u
        mask = (coord + rng.integers(period)) % period < period // 2
    elif pattern == "checkered":
        cell = int(rng.integers(7, 10))
        mask = ((u + rng.integers(cell)) // cell + (v + rng.integers(cell)) // cell) % 2 == 0
    elif pattern == "dotted":
        step = int(rng.integers(10, 13))
        radius = rng.uniform(2.6, 3.3)
        du = (u + rng.integers(step)) % step - (step - 1) / 2
        dv = (v + rng.integers(step)) % step - (step - 1) / 2
        mask = du * du + dv * dv <= radius * radius
    elif pattern == "ringed":
        period = int(rng.integers(8, 11))
        cy, cx = (h - 1) / 2 + rng.uniform(-3, 3), (w - 1) / 2 + rng.uniform(-3, 3)
        d = np.hypot(v - cy, u - cx)
        mask = (d + rng.uniform(0, period)) % period < period / 2
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    frame = (u < _FRAME) | (v < _FRAME) | (u >= w - _FRAME) | (v >= h - _FRAME)
    return mask | frame


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    light = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / (size / 2)
    image = (np.asarray(BACKGROUNDS[scene.background], np.float64) * rng.uniform(0.92, 1.06)
             + (light * rng.uniform(6, 16))[..., None])
    for p in scene.patches:
        fx0, fy0, fx1, fy1 = REGIONS[p.region]
        left, top, right, bottom = rng.integers(_MARGIN[0], _MARGIN[1] + 1, size=4)
        x0, y0 = round(fx0 * size) + left, round(fy0 * size) + top
        x1, y1 = round(fx1 * size) - right, round(fy1 * size) - bottom
        mask = _pattern_mask(p.pattern, y1 - y0, x1 - x0, rng)
        ink = np.asarray(INKS[p.ink], np.float64) * rng.uniform(0.9, 1.0)
        image[y0:y1, x0:x1][mask] = ink
    image += rng.normal(0, _NOISE, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------
def _patches_phrase(scene: Scene) -> str:
    return " and ".join(f"a {p.noun()} in the {p.region}" for p in scene.patches)


def all_captions(scene: Scene) -> list[str]:
    """Every caption of a scene, one per template, in template order."""
    phrase = _patches_phrase(scene)
    return [t.format(patches=phrase, background=scene.background) for t in CAPTION_TEMPLATES]


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """The scene's five captions (all of `all_captions`) in a random order."""
    every = all_captions(scene)
    return [every[i] for i in rng.permutation(len(every))]


def _question(kind: str, scene: Scene, rng: np.random.Generator) -> Optional[tuple[str, str]]:
    """A (question, answer) of `kind` about the scene, or None where the kind does not apply."""
    patches = scene.patches
    if kind == "count":
        return "how many patches are there?", str(len(patches))
    if kind == "background":
        return "what color is the background?", scene.background
    if kind in ("color", "pattern"):
        p = patches[rng.integers(len(patches))]
        if kind == "color":
            return f"what color is the patch in the {p.region}?", p.ink
        return f"what pattern is the patch in the {p.region}?", p.pattern
    if kind == "exists":
        present = sorted({(p.pattern, p.ink) for p in patches})
        if rng.random() < 0.5:
            pattern, ink = present[rng.integers(len(present))]
            answer = "yes"
        else:
            absent = [(pt, ik) for pt in PATTERNS for ik in INKS if (pt, ik) not in present]
            pattern, ink = absent[rng.integers(len(absent))]
            answer = "no"
        return f"is there a {pattern} {ink} patch?", answer
    if kind == "where":
        # Only a patch no other patch looks like can be asked about.
        unique = [p for p in patches if sum(q.noun() == p.noun() for q in patches) == 1]
        if not unique:
            return None
        p = unique[rng.integers(len(unique))]
        return f"where is the {p.noun()}?", p.region
    raise ValueError(f"unknown question kind {kind!r}")


def questions(scene: Scene, rng: np.random.Generator, n: int = 3) -> list[tuple[str, str, str]]:
    """`n` (question, answer, kind) triples of different kinds, drawn from those that apply."""
    out = []
    for i in rng.permutation(len(QUESTION_KINDS)):
        qa = _question(QUESTION_KINDS[i], scene, rng)
        if qa is not None:
            out.append((*qa, QUESTION_KINDS[i]))
        if len(out) == n:
            break
    return out


def question_kind(question: str) -> str:
    """The kind of one of this dataset's questions (one of `QUESTION_KINDS`)."""
    for start, kind in _QUESTION_STARTS:
        if question.lower().startswith(start):
            return kind
    raise ValueError(f"not a question of this dataset: {question!r}")


# ------------------------------------------------------------------------------------------------
# Splits and files
# ------------------------------------------------------------------------------------------------
def generate(split: str, num_examples: int, *, seed: int = 0) -> Iterator[dict]:
    """The examples of one split: {"image": PNG bytes, "image_id", "captions", "qa": [(question,
    answer, kind)], "scene": its `describe()`}. Image i is drawn from its own stream
    (tag, seed, split, i); test scenes are distinct in content and held out (`is_held_out`),
    train scenes never are."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    seen: set[str] = set()
    for i in range(num_examples):
        rng = np.random.default_rng([_STREAM_TAG, seed, SPLIT_CODES[split], i])
        for _ in range(1000):
            scene = sample_scene(rng)
            if is_held_out(scene) != (split == "test"):
                continue
            if split == "train" or scene.describe() not in seen:
                break
        else:
            raise ValueError(f"cannot draw {num_examples} distinct {split} scenes")
        seen.add(scene.describe())
        yield {"image": png_bytes(render(scene, rng)), "image_id": f"second_{split}_{i:06d}",
               "captions": captions(scene, rng), "qa": questions(scene, rng),
               "scene": scene.describe()}


def _write_json(path: str, entries: list) -> None:
    # A JSON list, one entry per line: compact, and readable with `head`.
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")


def write(out: str, sizes: dict, seed: int = 0) -> dict:
    """Images and annotation files of each split in `sizes` ({split: count}) under `out`;
    returns {split: (images, captions, questions)}."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    counts = {}
    for split, n in sizes.items():
        caption_entries, vqa_entries = [], []
        for ex in generate(split, n, seed=seed):
            rel = f"{ex['image_id'].removeprefix('second_')}.png"
            with open(os.path.join(out, "images", rel), "wb") as f:
                f.write(ex["image"])
            caption_entries.append({"image": rel, "caption": ex["captions"],
                                    "image_id": ex["image_id"]})
            for k, (question, answer, kind) in enumerate(ex["qa"]):
                vqa_entries.append({"question_id": f"{ex['image_id']}_q{k}", "image": rel,
                                    "question": question, "answer": [answer] * 10,
                                    "image_id": ex["image_id"], "question_type": kind})
        _write_json(os.path.join(out, f"captions_{split}.json"), caption_entries)
        _write_json(os.path.join(out, f"vqa_{split}.json"), vqa_entries)
        counts[split] = (len(caption_entries), sum(len(e["caption"]) for e in caption_entries),
                         len(vqa_entries))
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/second_dataset.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train", type=int, default=3000, help="train images")
    ap.add_argument("--test", type=int, default=100, help="test images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.train < 1 or args.test < 1 or args.seed < 0:
        ap.error("need --train >= 1, --test >= 1 and --seed >= 0")
    counts = write(args.out, {"train": args.train, "test": args.test}, args.seed)
    print(f"wrote to {args.out}: " + "; ".join(
        f"{split} {i} images, {c} captions, {q} questions" for split, (i, c, q) in counts.items())
        + " (images/, captions_{train,test}.json, vqa_{train,test}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
