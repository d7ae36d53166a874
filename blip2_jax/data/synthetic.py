"""The built-in synthetic dataset: procedurally rendered scenes with paraphrased captions and
VQA-style questions — our embedded default for the demo and the tests (no download).

A scene places 1-3 objects in distinct cells of a 3x3 grid; each object has a shape, a colour, a
size and a position, drawn with jitter of centre, radius and shade (shapes keep their orientation, so
"diamond" and "square" stay distinct) over a noisy dark background. Every caption
names every object with all four attributes, so captions are fully determined by the image and
any two scenes with different contents have different captions; paraphrases differ in wording and
object order only where the template says so. Within a split every scene's content is unique, so
retrieval ground truth is unambiguous. The test split's scenes come from a part of scene space
that no other split and nothing else drawn from this generator for training ever uses
(`held_out`: one scene content in 10, by a hash of `describe`), so a model is tested on scene
contents it never saw, not only on new renderings. Horizontal flips change "left"/"right": train on it with
flipping off.

    examples = synthetic.generate("train", 1000, seed=0)      # deterministic for (seed, split)
    next(examples)  # {"image": PNG bytes, "image_id": ..., "captions": [...], "qa": [(q, a), ...]}
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import string
import zlib
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = {"red": (222, 45, 38), "green": (49, 178, 74), "blue": (55, 90, 235),
          "yellow": (240, 220, 50), "purple": (152, 70, 205), "white": (240, 240, 240)}
SIZES = ("small", "large")
POSITIONS = (("top left", "top", "top right"),
             ("left", "center", "right"),
             ("bottom left", "bottom", "bottom right"))
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# The synthetic language's question prompt (the paper's VQA prompt); its words are in the
# tokenizers, and the demo's language model reads questions in it.
VQA_PROMPT = "Question: {} Answer:"

# Radius as a fraction of a grid cell; jitter keeps every object inside its own cell.
_RADIUS = {"small": 0.2, "large": 0.34}
_JITTER = 0.1
_SUPERSAMPLE = 2


@dataclasses.dataclass(frozen=True, order=True)
class Obj:
    row: int
    col: int
    shape: str
    color: str
    size: str

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    def noun(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


Scene = tuple  # tuple[Obj, ...] in reading order (row, then column)


HELD_OUT_ONE_IN = 10


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3, *,
                 held_out: bool | None = None) -> Scene:
    """A random scene; `held_out` True / False: drawn again until it is / is not a test-split
    scene (`held_out`), None: any."""
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        cells = rng.choice(9, size=n, replace=False)
        objs = [Obj(int(c) // 3, int(c) % 3, SHAPES[rng.integers(len(SHAPES))],
                    list(COLORS)[rng.integers(len(COLORS))], SIZES[rng.integers(len(SIZES))])
                for c in cells]
        scene = tuple(sorted(objs))
        if held_out is None or is_held_out(describe(scene)) == held_out:
            return scene


def describe(scene: Scene) -> str:
    """The canonical content of a scene (equal iff the captions are interchangeable)."""
    return "; ".join(f"{o.noun()} @ {o.position}" for o in scene)


def is_held_out(content: str) -> bool:
    """Whether a scene content (`describe(scene)`, or `parse_caption`'s) belongs to the test
    split: one content in HELD_OUT_ONE_IN, by a fixed hash (the same on every machine and run).
    The test split draws only these; the train and val splits and the demo's unimodal
    pre-training never do."""
    return zlib.crc32(content.encode()) % HELD_OUT_ONE_IN == 0


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)]
    if shape == "cross":
        t = r * 0.33
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator, image_size: int = 128) -> np.ndarray:
    """The scene as a (S, S, 3) uint8 image: noisy dark background, anti-aliased shapes."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    cell = big / 3
    for o in scene:
        cx = (o.col + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        cy = (o.row + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        r = _RADIUS[o.size] * cell * rng.uniform(0.9, 1.1)
        shade = rng.uniform(0.85, 1.0)
        fill = tuple(int(round(v * shade)) for v in COLORS[o.color])
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    shapes = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), np.int16)
    # Noise on a grey background; shapes are opaque (where drawn, their colour replaces it).
    noise = rng.integers(-6, 7, (image_size, image_size, 1), dtype=np.int16)
    background = rng.integers(25, 70) + noise
    coverage = shapes.max(axis=-1, keepdims=True) > 0
    return np.clip(np.where(coverage, shapes + noise // 2, background), 0, 255).astype(np.uint8)


def _place(o: Obj, rng: np.random.Generator) -> str:
    if o.position == "center":
        return str(rng.choice(["in the center", "in the middle"]))
    return f"{rng.choice(['in the', 'at the'])} {o.position}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` distinct paraphrases, each naming every object's size, colour, shape and position."""
    count = NUMBERS[len(scene)] + (" shape" if len(scene) == 1 else " shapes")
    templates = [
        lambda p: _join([f"a {o.noun()} {q}" for o, q in p]),
        lambda p: "there is " + _join([f"a {o.noun()} {q}" for o, q in p]),
        lambda p: f"{count}, " + _join([f"a {o.noun()} {q}" for o, q in p]),
        lambda p: "a picture of " + _join([f"a {o.noun()} {q}" for o, q in p]),
        lambda p: _join([f"{q} a {o.noun()}" for o, q in p]),
        lambda p: "a dark background with " + _join([f"a {o.noun()} {q}" for o, q in p]),
        lambda p: _join([f"a {o.color} {o.shape} of {o.size} size {q}" for o, q in p]),
        lambda p: f"an image with {count}, " + _join([f"a {o.noun()} {q}" for o, q in p]),
    ]
    order = rng.permutation(len(templates))
    out: list[str] = []
    for t in order:
        text = templates[t]([(o, _place(o, rng)) for o in scene])
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def _caption_grammar():
    """(object-then-place, place-then-object, caption frame) regexes of the caption templates."""
    alt = lambda words: "|".join(sorted(words, key=len, reverse=True))  # noqa: E731 longest first
    colors, shapes, sizes = alt(COLORS), alt(SHAPES), alt(SIZES)
    places = alt([p for row in POSITIONS for p in row] + ["middle"])
    # Group names start with the attribute's letter (two spellings of an object: s1/s2, ...).
    obj = (rf"(?:(?P<s1>{sizes}) (?P<c1>{colors}) (?P<h1>{shapes})"
           rf"|(?P<c2>{colors}) (?P<h2>{shapes}) of (?P<s2>{sizes}) size)")
    place = rf"(?:in|at) the (?P<p>{places})"
    frame = (rf"(?:there is |a picture of |a dark background with )?"
             rf"(?:(?:an image with )?(?P<n>{alt(NUMBERS)}) shapes?, )?(?P<rest>.*)")
    return re.compile(rf"a {obj} {place}"), re.compile(rf"{place} a {obj}"), re.compile(frame)


_CAPTION_GRAMMAR = _caption_grammar()


def parse_caption(text: str) -> str | None:
    """The scene a caption describes, as `describe(scene)`, or None when the text is not a
    caption of this language (every object needs its size, colour, shape and position, in
    distinct cells, agreeing with a stated count). Any paraphrase of a scene parses to the same
    string, so a generated caption is right iff it parses to its image's scene."""
    after, before, frame = _CAPTION_GRAMMAR
    m = frame.fullmatch(text.strip())
    parts = [p for p in m["rest"].replace(" and ", ", ").split(", ")] if m else []
    cells = {p: (r, c) for r, row in enumerate(POSITIONS) for c, p in enumerate(row)}
    cells["middle"] = cells["center"]
    objs = []
    for part in parts:
        g = after.fullmatch(part) or before.fullmatch(part)
        if g is None:
            return None
        d = {k[0]: v for k, v in g.groupdict().items() if v is not None}
        objs.append(Obj(*cells[d["p"]], d["h"], d["c"], d["s"]))
    if not objs or len({(o.row, o.col) for o in objs}) != len(objs):
        return None
    if m["n"] is not None and NUMBERS.index(m["n"]) != len(objs):
        return None
    return describe(tuple(sorted(objs)))


def questions(scene: Scene, rng: np.random.Generator, n: int = 3) -> list[tuple[str, str]]:
    """Up to `n` (question, answer) pairs of different kinds, each answerable from the image
    (`question_kind` names the kind)."""
    unique = [o for o in scene if sum((p.color, p.shape) == (o.color, o.shape) for p in scene) == 1]
    by_shape = [o for o in scene if sum(p.shape == o.shape for p in scene) == 1]
    makers = {
        # Digits, as VQAv2's answers: the official scoring maps a predicted "two" to "2".
        "count": lambda: ("how many shapes are there?", str(len(scene))),
        "color": lambda: (lambda o: (f"what color is the {o.shape}?", o.color))(
            by_shape[rng.integers(len(by_shape))]) if by_shape else None,
        "shape": lambda: (lambda o: (f"what shape is {_place(o, rng)}?", o.shape))(
            scene[rng.integers(len(scene))]),
        "size": lambda: (lambda o: (f"is the {o.color} {o.shape} small or large?", o.size))(
            unique[rng.integers(len(unique))]) if unique else None,
        "where": lambda: (lambda o: (f"where is the {o.color} {o.shape}?", o.position))(
            unique[rng.integers(len(unique))]) if unique else None,
        "exists": lambda: _exists_question(scene, rng),
    }
    out = []
    for kind in rng.permutation(list(makers)):
        qa = makers[kind]()
        if qa is not None:
            out.append(qa)
        if len(out) == n:
            break
    return out


_QUESTION_KINDS = (("how many", "count"), ("what color", "color"), ("what shape", "shape"),
                   ("is there", "exists"), ("is the", "size"), ("where is", "where"))


def question_kind(question: str) -> str:
    """The kind of a synthetic question: count, color, shape, size, where or exists."""
    for start, kind in _QUESTION_KINDS:
        if question.startswith(start):
            return kind
    raise ValueError(f"not a synthetic question: {question!r}")


def _exists_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in scene}
    if rng.random() < 0.5:
        color, shape = sorted(present)[rng.integers(len(present))]
        return f"is there a {color} {shape}?", "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = absent[rng.integers(len(absent))]
    return f"is there a {color} {shape}?", "no"


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def generate(split: str, num_examples: int, *, seed: int = 0, image_size: int = 128,
             min_objects: int = 1, max_objects: int = 3, num_captions: int = 5,
             num_questions: int = 3) -> Iterator[dict]:
    """Examples of one split, deterministic for (seed, split); scenes unique within the split;
    the test split's scenes held out (`is_held_out`), the other splits' never."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if not 1 <= min_objects <= max_objects <= 9:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, "
                         f"{max_objects}")
    rng = np.random.default_rng([seed, SPLIT_CODES[split]])
    seen: set[str] = set()
    for i in range(num_examples):
        for _ in range(1000):
            scene = sample_scene(rng, min_objects, max_objects, held_out=split == "test")
            if describe(scene) not in seen:
                break
        else:
            raise ValueError(f"cannot draw {num_examples} distinct scenes with "
                             f"{min_objects}-{max_objects} objects")
        seen.add(describe(scene))
        yield {"image": png_bytes(render(scene, rng, image_size)),
               "image_id": f"synthetic_{split}_{i:06d}",
               "captions": captions(scene, rng, num_captions),
               "qa": questions(scene, rng, num_questions),
               "scene": describe(scene)}


# ------------------------------------------------------------------------------------------------
# Tokenizers for the synthetic language (tiny models need tiny vocabularies)
# ------------------------------------------------------------------------------------------------
QFORMER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def write_tokenizers(texts: list[str], out_dir: str, *, qformer_vocab: int | None = 100,
                     opt_vocab: int = 384, t5_vocab: int | None = 256,
                     llama_vocab: int = 384) -> dict[str, str]:
    """Small tokenizers of the four families, fitted to `texts`, under
    `out_dir/{qformer,opt,t5,llama}`:

    qformer: a BERT `vocab.txt` with the usual specials ([PAD] = 0), every word, and [unused]
        fillers up to `qformer_vocab - 1` entries, so that `load_tokenizer(..., "qformer")`
        appends [DEC] as id `qformer_vocab - 1` (the model's vocab_size is `qformer_vocab`);
    opt: GPT-2-style byte-level BPE (`vocab.json` + `merges.txt`) with OPT's specials <s> 0,
        <pad> 1, </s> 2, <unk> 3 and "\\n" as a token, `opt_vocab` entries;
    t5: a SentencePiece-style Unigram `tokenizer.json` with T5's <pad> 0, </s> 1, <unk> 2, one
        piece per word plus single characters;
    llama: a SentencePiece-style BPE `tokenizer.json` ("\u2581" word starts, byte fallback) with
        LLaMA's <unk> 0, <s> 1, </s> 2 and no pad token, at most `llama_vocab` entries; its
        alphabet adds the ASCII letters, digits and punctuation to the texts' characters.
    `qformer_vocab` / `t5_vocab` None: as many entries as the texts need, rounded up to a
    multiple of 32. Deterministic for the same texts."""

    dirs = {k: os.path.join(out_dir, k) for k in ("qformer", "opt", "t5", "llama")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = list(QFORMER_SPECIALS) + words
    if qformer_vocab is None:
        qformer_vocab = _round_up(len(vocab) + 1, 32)
    if len(vocab) > qformer_vocab - 1:
        raise ValueError(f"{len(vocab)} words and specials do not fit a Q-Former vocabulary of "
                         f"{qformer_vocab} (one id is [DEC])")
    vocab += [f"[unused{i}]" for i in range(qformer_vocab - 1 - len(vocab))]
    with open(os.path.join(dirs["qformer"], "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")

    corpus = sorted(set(texts))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus + ["\n"], trainers.BpeTrainer(
        vocab_size=opt_vocab, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.model.save(dirs["opt"])

    # Unigram pieces: each word as one piece (favoured), then single characters as a fallback.
    # (Unigram *training* on such a small, repetitive corpus keeps mostly characters.)
    chars = sorted({c for t in corpus for c in t if not c.isspace()})
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
              + [("\u2581" + w, -1.0) for w in words] + [("\u2581", -5.0)]
              + [(c, -10.0) for c in chars])
    if t5_vocab is None:
        t5_vocab = _round_up(len(pieces), 32)
    if len(pieces) > t5_vocab:
        raise ValueError(f"{len(pieces)} pieces do not fit a T5 vocabulary of {t5_vocab}")
    uni = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.save(os.path.join(dirs["t5"], "tokenizer.json"))

    spbpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spbpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    spbpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = sorted(({c for t in corpus for c in t} | set(string.ascii_letters + string.digits
                                                           + string.punctuation)) - {" ", "\n"})
    spbpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=llama_vocab, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet + ["\u2581"], show_progress=False))
    spbpe.save(os.path.join(dirs["llama"], "tokenizer.json"))
    return dirs
