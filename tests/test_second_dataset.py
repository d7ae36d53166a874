"""bench/second_dataset.py: the second image-text dataset is deterministic, its splits differ,
its files read as LAVIS annotations, its images show what its text says, and its words are not
the built-in synthetic dataset's."""
import io
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import records, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import second_dataset as sd  # noqa: E402

SIZES = ["--train", "20", "--test", "5", "--seed", "3"]


def _files(d):
    out = {}
    for base, _, names in os.walk(d):
        for n in names:
            path = os.path.join(base, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = f.read()
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("second")
    assert sd.main(["--out", str(d)] + SIZES) == 0
    return d


def test_deterministic_and_complete(made, tmp_path):
    assert sd.main(["--out", str(tmp_path)] + SIZES) == 0
    first, second = _files(made), _files(tmp_path)
    assert first == second
    assert sorted(first) == sorted(
        [f"captions_{s}.json" for s in ("train", "test")]
        + [f"vqa_{s}.json" for s in ("train", "test")]
        + [os.path.join("images", f"train_{i:06d}.png") for i in range(20)]
        + [os.path.join("images", f"test_{i:06d}.png") for i in range(5)])
    for name, data in first.items():
        if name.endswith(".png"):
            with Image.open(io.BytesIO(data)) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (96, 96))


def test_seed_changes_everything(made, tmp_path):
    sd.main(["--out", str(tmp_path), "--train", "20", "--test", "5", "--seed", "4"])
    other = _files(tmp_path)
    assert all(other[k] != v for k, v in _files(made).items())


def test_splits_differ_and_images_do_not_depend_on_the_count():
    train = list(sd.generate("train", 20, seed=3))
    test = list(sd.generate("test", 5, seed=3))
    assert not {e["image"] for e in train} & {e["image"] for e in test}
    assert [e["scene"] for e in train[:5]] != [e["scene"] for e in test]
    # Each image has its own stream: asking for fewer images gives the same first ones.
    assert [e["image"] for e in sd.generate("train", 3, seed=3)] == [e["image"] for e in train[:3]]
    # Test scenes are distinct in content (retrieval ground truth): 300 draws would repeat some
    # of the 864 one-patch scenes. Both patch counts occur.
    many = list(sd.generate("test", 300, seed=0))
    assert len({e["scene"] for e in many}) == 300
    assert {e["scene"].count(";") for e in many} == {0, 1}

    # Test contents come from a part of scene space the train split never draws from.
    train = list(sd.generate("train", 300, seed=0))
    assert not {e["scene"] for e in train} & {e["scene"] for e in many}


def test_reads_as_lavis_annotations(made):
    images = os.path.join(made, "images")
    for split, n in (("train", 20), ("test", 5)):
        caps = records.caption_entries(os.path.join(made, f"captions_{split}.json"))
        grouped = records.retrieval_entries(os.path.join(made, f"captions_{split}.json"))
        assert len(caps) == len(grouped) == n
        assert len({e.image_id for e in grouped}) == n
        for e in grouped:
            assert len(e.captions) == len(set(e.captions)) == 5
            assert all(len(c.split()) <= 23 and c == c.lower() and not re.search(r"[^a-z ]", c)
                       for c in e.captions)
            assert isinstance(records.read_image(images, e.image), bytes)
        vqa = records.vqa_entries(os.path.join(made, f"vqa_{split}.json"))
        assert len(vqa) == 3 * n
        raw = json.load(open(os.path.join(made, f"vqa_{split}.json")))
        by_image = {}
        for e, r in zip(vqa, raw):
            assert len(e.answers) == 10 and len(set(e.answers)) == 1
            kind = sd.question_kind(e.question)
            assert kind == r["question_type"]
            assert e.answers[0] in sd.ANSWERS[kind]
            by_image.setdefault(e.image_id, []).append(kind)
        assert {k: len(set(v)) for k, v in by_image.items()} == {e.image_id: 3 for e in grouped}


def test_text_and_answers_match_the_scene():
    for i in range(60):
        rng = np.random.default_rng([5, i])
        scene = sd.sample_scene(rng)
        caps = sd.captions(scene, rng)
        assert sorted(caps) == sorted(sd.all_captions(scene))
        phrase = " and ".join(f"a {p.pattern} {p.ink} patch in the {p.region}"
                              for p in scene.patches)
        assert all(phrase in c and scene.background in c.split() for c in caps)
        qa = sd.questions(scene, rng)
        assert len({kind for _, _, kind in qa}) == 3
        for q, a, kind in qa:
            assert sd.question_kind(q) == kind
            by_region = {f"the patch in the {p.region}?": p for p in scene.patches}
            if kind == "count":
                assert a == str(len(scene.patches))
            elif kind == "background":
                assert a == scene.background
            elif kind == "color":
                assert a == by_region[q[len("what color is "):]].ink
            elif kind == "pattern":
                assert a == by_region[q[len("what pattern is "):]].pattern
            elif kind == "exists":
                nouns = {p.noun() for p in scene.patches}
                assert (a == "yes") == (q[len("is there a "):-1] in nouns)
            else:
                (p,) = [p for p in scene.patches if p.noun() == q[len("where is the "):-1]]
                assert a == p.region


def _close(pixels, rgb, tol=50):
    return np.linalg.norm(pixels.astype(float) - np.asarray(rgb, float), axis=-1) <= tol


def test_images_show_the_scene():
    size = sd.IMAGE_SIZE
    for i in range(40):
        rng = np.random.default_rng([7, i])
        scene = sd.sample_scene(rng)
        image = sd.render(scene, rng)
        used = np.zeros((size, size), bool)
        for p in scene.patches:
            x0, y0, x1, y1 = (round(f * size) for f in sd.REGIONS[p.region])
            used[y0:y1, x0:x1] = True
            ink = _close(image[y0:y1, x0:x1], sd.INKS[p.ink])
            assert ink.mean() > (0.5 if p.pattern == "plain" else 0.08), (scene, p)
            # The patch (its frame) spans its half, less the margins.
            rows, cols = np.nonzero(ink)
            assert np.ptp(rows) >= (y1 - y0) - 2 * sd._MARGIN[1] - 1, (scene, p)
            assert np.ptp(cols) >= (x1 - x0) - 2 * sd._MARGIN[1] - 1, (scene, p)
        # A single patch leaves a half empty: no ink there, the background colour shows.
        rest = image[~used]
        if len(scene.patches) == 1:
            assert not any(_close(rest, rgb).mean() > 0.01 for rgb in sd.INKS.values()), scene
            assert _close(rest, sd.BACKGROUNDS[scene.background], 40).mean() > 0.9, scene
        else:
            assert not len(rest)


def test_no_word_of_the_builtin_dataset():
    texts = [t for ex in sd.generate("train", 200, seed=0)
             for t in ex["captions"] + [x for q, a, _ in ex["qa"] for x in (q, a)]]
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    banned = set(synthetic.COLORS) | set(synthetic.SHAPES) | set(synthetic.SIZES)
    assert not {w for w in words if w in banned or w.rstrip("s") in banned}
    # Every pattern, ink, background and half shows up in the text.
    joined = " ".join(texts)
    assert all(w in joined for w in [*sd.PATTERNS, *sd.INKS, *sd.BACKGROUNDS, *sd.REGIONS])


def test_question_kind_rejects_other_questions():
    with pytest.raises(ValueError):
        sd.question_kind("what shape is in the center?")
    assert sd.question_kind("What color is the background?") == "background"
