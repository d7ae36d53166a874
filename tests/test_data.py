"""The input pipeline: builders (every source format, fault injection), the synthetic set, image
ops (augmentation statistics, eval parity with processing.preprocess_images) and the grain
pipeline (determinism, process sharding, mixtures, checkpoint/restore, bad records)."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from blip2_jax import processing
from blip2_jax.data import build as build_cli
from blip2_jax.data import batch as batch_lib, builders, ops, pipeline, records, synthetic
from blip2_jax.train import unimodal

from assets import bert_vocab

SYN = dict(train=48, val=16, test=20)


def _png(rgb, fmt="PNG", mode=None):
    im = Image.fromarray(np.asarray(rgb, np.uint8))
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _image(seed, size=(40, 30)):
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    argv = ["synthetic", "--data-dir", d, "--image-size", "48"]
    for split, n in SYN.items():
        argv += [f"--{split}", str(n)]
    assert build_cli.main(argv) == 0
    return d


# ------------------------------------------------------------------------------------------------
# The synthetic dataset
# ------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_seeded():
    a = list(synthetic.generate("train", 12, seed=3, image_size=32))
    b = list(synthetic.generate("train", 12, seed=3, image_size=32))
    c = list(synthetic.generate("train", 12, seed=4, image_size=32))
    v = list(synthetic.generate("val", 12, seed=3, image_size=32))
    assert a == b
    assert [e["scene"] for e in a] != [e["scene"] for e in c]
    assert [e["scene"] for e in a] != [e["scene"] for e in v]


def test_synthetic_captions_and_answers_are_determined_by_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = synthetic.sample_scene(rng)
        caps = synthetic.captions(scene, rng)
        assert len(caps) == 5 and len(set(caps)) == 5
        for cap in caps:
            assert processing.pre_caption(cap) == cap    # survives LAVIS cleaning unchanged
            for o in scene:                                # every attribute of every object
                assert o.shape in cap and o.color in cap and o.size in cap
                assert (o.position in cap) or (o.position == "center" and "middle" in cap)
            assert sum(cap.count(s) for s in synthetic.SHAPES) == len(scene)
        for q, a in synthetic.questions(scene, rng, 6):
            kind = synthetic.question_kind(q)
            if kind == "count":
                assert a == str(len(scene))     # digits, as VQAv2 (scored as "2", never "two")
            elif kind == "color":
                shape = q[len("what color is the "):-1]
                assert [o.color for o in scene if o.shape == shape] == [a]
            elif kind == "exists":
                color, shape = q[len("is there a "):-1].split(" ")
                assert a == ("yes" if any((o.color, o.shape) == (color, shape) for o in scene)
                             else "no")
            elif kind == "where":
                color, shape = q[len("where is the "):-1].split(" ")
                assert [o.position for o in scene if (o.color, o.shape) == (color, shape)] == [a]
            elif kind == "shape":
                assert q.startswith("what shape is ") and a in synthetic.SHAPES
            else:
                assert kind == "size" and q.startswith("is the ") and a in synthetic.SIZES
        assert {synthetic.question_kind(q) for q, _ in synthetic.questions(scene, rng, 6)} >= {
            "count", "shape", "exists"}                  # the kinds every scene can be asked


def test_synthetic_captions_parse_back_to_their_scene():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = synthetic.sample_scene(rng)
        for cap in synthetic.captions(scene, rng, 8):
            assert synthetic.parse_caption(cap) == synthetic.describe(scene), cap
    one = "a small red star in the top"
    assert synthetic.parse_caption(one) == "small red star @ top"
    assert synthetic.parse_caption("a red star of small size at the top") == "small red star @ top"
    for wrong in ("", "garbage", "a small red star", "a red star in the top",   # missing parts
                  "two shapes, " + one,                                          # wrong count
                  one + " and a large blue circle in the top",                   # same cell twice
                  one + " and", one + ", a small red star in the left extra"):
        assert synthetic.parse_caption(wrong) is None, wrong


def test_synthetic_render_draws_each_object_in_its_cell():
    rng = np.random.default_rng(1)
    size = 96
    for _ in range(30):
        scene = synthetic.sample_scene(rng, 1, 4)
        img = synthetic.render(scene, rng, size).astype(int)
        cell = size // 3
        occupied = {(o.row, o.col): o for o in scene}
        for r in range(3):
            for c in range(3):
                block = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3)
                bright = block[block.max(axis=1) > 110]
                if (r, c) not in occupied:
                    assert len(bright) == 0
                    continue
                o = occupied[(r, c)]
                ref = np.asarray(synthetic.COLORS[o.color])
                colour = np.median(bright, axis=0)
                assert np.abs(colour - ref).max() < 45, (o, colour)
                frac = len(bright) / len(block)
                assert (frac > 0.12) if o.size == "large" else (frac < 0.2), (o, frac)


def test_synthetic_scenes_are_unique_within_a_split():
    scenes = [e["scene"] for e in synthetic.generate("test", 300, seed=0, image_size=16)]
    assert len(set(scenes)) == 300


def test_synthetic_test_scenes_are_held_out_of_everything_trained_on():
    """The test split's scene contents are never drawn for training: not by the train or val
    splits, nor by the demo's unimodal pre-training (its images' scenes and its LM's text)."""
    test = {e["scene"] for e in synthetic.generate("test", 60, seed=0, image_size=16)}
    assert all(synthetic.is_held_out(s) for s in test)
    for split in ("train", "val"):
        scenes = {e["scene"] for e in synthetic.generate(split, 600, seed=0, image_size=16)}
        assert not any(synthetic.is_held_out(s) for s in scenes) and not scenes & test
    docs = unimodal.text_corpus(300, seed=0, questions=1)
    assert not any(synthetic.is_held_out(synthetic.parse_caption(d[0])) for d in docs)
    # About one content in 10 is held out: the rule is a partition, not an exclusion list.
    rng = np.random.default_rng(0)
    share = np.mean([synthetic.is_held_out(synthetic.describe(synthetic.sample_scene(rng)))
                     for _ in range(3000)])
    assert 0.07 < share < 0.13


def test_build_synthetic_writes_both_schemas(data_dir):
    caps = builders.open_split(data_dir, "blip2_captions/synthetic", "test")
    vqa = builders.open_split(data_dir, "blip2_vqa/synthetic", "test")
    assert len(caps) == SYN["test"]
    assert len(vqa) == 3 * SYN["test"]
    rec = caps[0]
    assert Image.open(io.BytesIO(rec["image"])).size == (48, 48)
    assert len(rec["captions"]) == 5
    assert sorted(int(caps[i]["index"]) for i in range(len(caps))) == list(range(SYN["test"]))
    q = vqa[0]
    assert len(q["answers"]) == 10 and len(set(q["answers"])) == 1
    for split, n in SYN.items():
        assert len(builders.open_split(data_dir, "blip2_captions/synthetic", split)) == n


def test_build_synthetic_writes_tokenizers_of_its_language(data_dir):
    base = build_cli.tokenizer_dir(data_dir)
    caption = synthetic.captions(synthetic.sample_scene(np.random.default_rng(9)),
                                 np.random.default_rng(9))[0]
    qtok = processing.load_tokenizer(os.path.join(base, "qformer"), "qformer")
    assert len(qtok) == 100 and qtok.bos_token_id == 99 and qtok.pad_token_id == 0
    ids, _ = processing.tokenize_prompts(qtok, caption, kind="qformer")
    assert qtok.unk_token_id not in ids[0]                      # every word is in the vocab
    assert len(ids[0]) == len(caption.replace(",", " ,").split()) + 2
    opt = processing.load_tokenizer(os.path.join(base, "opt"), "opt")
    assert (opt.bos_token_id, opt.pad_token_id) == (2, 1)
    assert len(opt("\n", add_special_tokens=False)["input_ids"]) == 1
    ids, _ = processing.tokenize_prompts(opt, caption, kind="opt")
    assert processing.decode(opt, ids[:, 1:]) == [caption]
    t5 = processing.load_tokenizer(os.path.join(base, "t5"), "t5")
    assert (t5.eos_token_id, t5.pad_token_id) == (1, 0)
    ids, _ = processing.tokenize_prompts(t5, caption, kind="t5")
    assert processing.decode(t5, ids, eos_token_id=1) == [caption]
    assert len(ids[0]) == len(caption.replace(",", " ,").split()) + 1     # a piece per word
    llama = processing.load_tokenizer(os.path.join(base, "llama"), "llama")
    assert (llama.unk_token_id, llama.bos_token_id, llama.eos_token_id) == (0, 1, 2)
    ids, _ = processing.tokenize_prompts(llama, caption, kind="llama")
    assert processing.decode(llama, ids[:, 1:]) == [caption] and 0 not in ids[0]


# ------------------------------------------------------------------------------------------------
# Builders from annotation files (fault injection included)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(_png(_image(0), "JPEG"))
    (root / "b.png").write_bytes(_png(_image(1)))
    (root / "sub" / "grey.png").write_bytes(_png(_image(2), mode="L"))
    (root / "c.gif").write_bytes(_png(_image(3), "GIF"))
    (root / "rgba.png").write_bytes(_png(_image(4), mode="RGBA"))
    (root / "corrupt.jpg").write_bytes(_png(_image(5), "JPEG")[:200])   # truncated
    (root / "garbage.png").write_bytes(b"not an image at all")
    return str(root)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def _run(argv, capsys):
    code = build_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_build_captions_reports_and_skips_bad_images(tmp_path, image_root, capsys):
    ann = _write(tmp_path / "train.json", [
        {"image": "a.jpg", "caption": "A dog.", "image_id": 7},
        {"image": "b.png", "caption": ["two", "captions"]},
        {"image": "sub/grey.png", "caption": "grey"},
        {"image": "c.gif", "caption": "gif"},
        {"image": "rgba.png", "caption": "rgba"},
        {"image": "corrupt.jpg", "caption": "x"},
        {"image": "missing.jpg", "caption": "y"},
        {"image": "garbage.png", "caption": "z"},
        {"image": "a.jpg", "caption": "the same dog", "image_id": 7},
    ])
    val = _write(tmp_path / "val.json", [{"image": "b.png", "caption": "v"}])
    d = str(tmp_path / "out")
    code, out, err = _run(["captions", "--annotations", ann, f"val={val}", "--image-root",
                           image_root, "--data-dir", d, "--name", "mine"], capsys)
    assert code == 0, err
    assert "train: 6 examples, 3 skipped" in out and "val: 1 examples, 0 skipped" in out
    for key in ("corrupt.jpg", "missing.jpg", "garbage.png"):
        assert key in out
    meta = json.load(open(os.path.join(builders.dataset_path(d, "blip2_captions/mine"),
                                       "metadata.json")))
    assert meta["train"]["skipped"] == 3 and len(meta["train"]["first_skipped"]) == 3

    src = builders.open_split(d, "blip2_captions/mine", "train")
    by_index = {int(src[i]["index"]): src[i] for i in range(len(src))}
    assert sorted(by_index) == [0, 1, 2, 3, 4, 8]
    # JPEG/PNG RGB bytes are kept as they are; others become RGB PNG.
    assert by_index[0]["image"] == open(os.path.join(image_root, "a.jpg"), "rb").read()
    assert by_index[1]["image"] == open(os.path.join(image_root, "b.png"), "rb").read()
    for i in (2, 3, 4):
        im = Image.open(io.BytesIO(by_index[i]["image"]))
        assert im.format == "PNG" and im.mode == "RGB"
    assert [c.decode() for c in by_index[1]["captions"]] == ["two", "captions"]
    assert by_index[0]["image_id"] == b"7" and by_index[8]["image_id"] == b"7"
    # Captions of one image share its dense image_index (image-id-aware ITC).
    assert by_index[0]["image_index"] == by_index[8]["image_index"]
    assert len({int(r["image_index"]) for r in by_index.values()}) == 5

    # Existing datasets are not overwritten by accident; --overwrite replaces them.
    code, _, err = _run(["captions", "--annotations", val, "--image-root", image_root,
                         "--data-dir", d, "--name", "mine"], capsys)
    assert code == 2 and "already exists" in err
    code, out, err = _run(["captions", "--annotations", val, "--image-root", image_root,
                           "--data-dir", d, "--name", "mine", "--overwrite"], capsys)
    assert code == 0 and "train: 1 examples" in out


@pytest.mark.parametrize("content, message", [
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"},", "not valid JSON"),
    ("{\"image\": \"a.jpg\"}", "expected a JSON list"),
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"}, {\"image\": \"b.png\"}]",
     "entry 1: missing 'caption'"),
    ("[{\"image\": \"a.jpg\", \"caption\": 3}]", "entry 0: 'caption' must be str or list"),
    ("[{\"image\": \"a.jpg\", \"caption\": [\"ok\", 5]}]", "entry 0: 'caption' must be a non-empty"),
    ("[{\"image\": \"a.jpg\", \"caption\": \"x\"}, 12]", "entry 1: expected an object"),
    ("[{\"image\": \"\", \"caption\": \"x\"}]", "entry 0: 'image' is empty"),
    ("[]", "no entries"),
])
def test_malformed_caption_annotations_fail_naming_file_and_entry(tmp_path, image_root, capsys,
                                                                  content, message):
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    d = tmp_path / "out"
    code, _, err = _run(["captions", "--annotations", str(ann), "--image-root", image_root,
                         "--data-dir", str(d)], capsys)
    assert code == 2
    assert str(ann) in err and message in err, err
    assert not (d / "blip2_captions").exists()      # nothing written


def test_build_retrieval_groups_captions_per_image(tmp_path, image_root, capsys):
    ann = _write(tmp_path / "test.json", [
        {"image": "b.png", "caption": ["b one", "b two"], "image_id": "b"},
        {"image": "a.jpg", "caption": "a one", "image_id": "a"},
        {"image": "a.jpg", "caption": "a two", "image_id": "a"},
    ])
    d = str(tmp_path / "out")
    code, out, err = _run(["retrieval", "--annotations", ann, "--image-root", image_root,
                           "--data-dir", d], capsys)
    assert code == 0, err
    assert "test: 2 examples" in out
    src = builders.open_split(d, "blip2_captions/test", "test")
    recs = sorted((src[i] for i in range(len(src))), key=lambda r: int(r["index"]))
    assert [[c.decode() for c in r["captions"]] for r in recs] == [["b one", "b two"],
                                                                   ["a one", "a two"]]
    truth = builders.retrieval_truth(d, "blip2_captions/test", "test")
    assert truth.image_ids == ["b", "a"]
    assert truth.texts == ["b one", "b two", "a one", "a two"]
    assert list(truth.text_to_image) == [0, 0, 1, 1]
    assert truth.image_to_texts == [[0, 1], [2, 3]]
    assert [int(src[int(r)]["index"]) for r in truth.records] == [0, 1]
    bad = _write(tmp_path / "bad.json", [{"image": "a.jpg", "caption": "x", "image_id": 1},
                                         {"image": "a.jpg", "caption": "y", "image_id": 2}])
    code, _, err = _run(["retrieval", "--annotations", bad, "--image-root", image_root,
                         "--data-dir", d], capsys)
    assert code == 2 and "two image ids" in err and bad in err


def test_build_vqa(tmp_path, image_root, capsys):
    ann = _write(tmp_path / "vqa.json", [
        {"question_id": 11, "image": "a.jpg", "question": "What is it?",
         "answer": ["dog", "dog", "cat"]},
        {"question_id": "g2", "image": "b.png", "question": "Where?", "answer": "left"},
        {"question_id": 12, "image": "missing.jpg", "question": "Q?", "answer": "a"},
    ])
    d = str(tmp_path / "out")
    code, out, err = _run(["vqa", "--annotations", f"val={ann}", "--image-root", image_root,
                           "--data-dir", d], capsys)
    assert code == 0, err
    assert "val: 2 examples, 1 skipped" in out and "question 12" in out
    src = builders.open_split(d, "blip2_vqa/vqa", "val")
    recs = {src[i]["question_id"].decode(): src[i] for i in range(len(src))}
    assert [a.decode() for a in recs["11"]["answers"]] == ["dog", "dog", "cat"]
    assert [a.decode() for a in recs["g2"]["answers"]] == ["left"]
    dup = _write(tmp_path / "dup.json", [
        {"question_id": 1, "image": "a.jpg", "question": "q", "answer": "a"},
        {"question_id": 1, "image": "b.png", "question": "q", "answer": "a"}])
    code, _, err = _run(["vqa", "--annotations", dup, "--image-root", image_root,
                         "--data-dir", d], capsys)
    assert code == 2 and "entry 1: question_id '1' repeats entry 0" in err


def test_build_tokenizers_fits_a_datasets_own_text(tmp_path, image_root, capsys):
    """`build tokenizers`: a dataset's training captions, questions and answers tokenize with
    no unknown word, in a Q-Former vocabulary sized to them; a dataset not built is named."""
    words = [f"zork{i} blim{i}" for i in range(150)]           # more words than synthetic's 100
    caps = _write(tmp_path / "caps.json", [{"image": "a.jpg", "caption": words[:100]},
                                           {"image": "b.png", "caption": words[100:]}])
    vqa = _write(tmp_path / "vqa.json", [{"question_id": 1, "image": "a.jpg",
                                          "question": "which quux?", "answer": "frobnic"}])
    d = str(tmp_path / "out")
    for kind, ann in (("captions", caps), ("vqa", vqa)):
        code, _, err = _run([kind, "--annotations", ann, "--image-root", image_root,
                             "--data-dir", d, "--name", "mine"], capsys)
        assert code == 0, err
    code, out, err = _run(["tokenizers", "--data-dir", d, "--name", "mine"], capsys)
    assert code == 0, err
    # 150 captions, the question in the VQA prompt, its answer
    assert "fitted to 152 texts of mine's train split" in out
    base = build_cli.tokenizer_dir(d, "mine")
    qtok = processing.load_tokenizer(os.path.join(base, "qformer"), "qformer")
    assert len(qtok) == 320 and qtok.bos_token_id == 319      # 5 specials, 307 words, [DEC]: up to 32s
    for text in (words[7], words[140], "Question: which quux? Answer: frobnic"):
        ids, _ = processing.tokenize_prompts(qtok, text, kind="qformer")
        assert qtok.unk_token_id not in ids[0], text
        opt = processing.load_tokenizer(os.path.join(base, "opt"), "opt")
        ids, _ = processing.tokenize_prompts(opt, text, kind="opt")
        assert processing.decode(opt, ids[:, 1:]) == [text]
    code, _, err = _run(["tokenizers", "--data-dir", d, "--name", "theirs"], capsys)
    assert code == 2 and "no dataset named 'theirs'" in err and "blip2_captions/mine" in err


def _tar(path, samples, truncate=None):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if truncate:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:truncate])


def test_build_webdataset_streams_shards_and_skips_bad_samples(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    jpg = _png(_image(0, (64, 48)), "JPEG")
    _tar(shards / "000.tar", [("s0.jpg", jpg), ("s0.txt", b"first caption"),
                              ("s1.png", _png(_image(1))), ("s1.json", b'{"caption": "json cap"}'),
                              ("s2.jpg", jpg),                                  # no caption
                              ("s3.jpg", b"corrupt"), ("s3.txt", b"bad image"),
                              ("s4.txt", b"no image")])
    _tar(shards / "001.tar", [("t0.jpg", jpg), ("t0.txt", b"second shard")])
    _tar(shards / "002.tar", [("u0.jpg", jpg), ("u0.txt", b"ok"),
                              ("u1.jpg", jpg), ("u1.txt", b"lost")],
         truncate=512 + -(-len(jpg) // 512) * 512 + 1024 + 700)        # inside u1.jpg
    d = str(tmp_path / "out")
    code, out, err = _run(["webdataset", "--shards", str(shards / "{000..002}.tar"),
                           "--data-dir", d, "--name", "web"], capsys)
    assert code == 0, err
    assert "train: 4 examples, 4 skipped" in out, out
    assert "000.tar:s2" in out and "000.tar:s3" in out and "002.tar:u1" in out
    src = builders.open_split(d, "blip2_captions/web", "train")
    caps = sorted(src[i]["captions"][0].decode() for i in range(len(src)))
    assert caps == ["first caption", "json cap", "ok", "second shard"]
    code, _, err = _run(["webdataset", "--shards", str(shards / "nope-*.tar"), "--data-dir", d,
                         "--name", "x"], capsys)
    assert code == 2 and "matched nothing" in err


def test_expand_shards(tmp_path):
    assert build_cli.expand_shards("a/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar"]
    assert build_cli.expand_shards("s-{000..002}-{x,y}.tar") == [
        "s-000-x.tar", "s-000-y.tar", "s-001-x.tar", "s-001-y.tar", "s-002-x.tar", "s-002-y.tar"]


def test_webdataset_reader_memory_is_one_sample(tmp_path):
    # The reader is a generator over a streaming tar: it yields before reading the next sample.
    _tar(tmp_path / "s.tar", [(f"k{i}.txt", b"c") for i in range(3)])
    gen = records.webdataset_samples([str(tmp_path / "s.tar")])
    first = next(gen)
    assert isinstance(first, records.Skipped) and first.key == "s.tar:k0"


# ------------------------------------------------------------------------------------------------
# Image ops
# ------------------------------------------------------------------------------------------------
def test_crop_box_statistics():
    rng = np.random.default_rng(0)
    for width, height in [(640, 480), (300, 451), (224, 224)]:
        fracs, ratios = [], []
        for _ in range(2000):
            left, top, w, h = ops.crop_box(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            fracs.append(w * h / (width * height))
            ratios.append(w / h)
        fracs, ratios = np.array(fracs), np.array(ratios)
        # Rounding to whole pixels moves the bounds by at most a pixel on each side.
        assert fracs.min() >= 0.5 - 4 / min(width, height) and fracs.max() <= 1.0
        # Uniform on [0.5, 1], less the large crops whose aspect ratio does not fit (retried).
        assert 0.6 < fracs.mean() < 0.8 and fracs.min() < 0.52 and fracs.max() > 0.85
        assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    # The torchvision fallback (a centre crop clamped to the ratio) for extreme shapes.
    left, top, w, h = ops.crop_box(1000, 10, np.random.default_rng(0))
    assert (w, h) == (13, 10) and left == (1000 - 13) // 2


def test_flip_rate_and_randaugment():
    rng = np.random.default_rng(0)
    img = Image.fromarray(_image(0, (32, 32)))
    flips = [ops.hflip(img, rng) is not img for _ in range(4000)]
    assert abs(np.mean(flips) - 0.5) < 0.03       # 4 sigma
    flipped = next(x for x in (ops.hflip(img, rng) for _ in range(10)) if x is not img)
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    # A low-contrast gradient with texture: every op but Identity changes it (at magnitude 8;
    # at LAVIS's 5, Brightness and Sharpness have factor 1.0 and change nothing, as in LAVIS).
    grad = np.linspace(60, 140, 32)[None, :, None] + _image(1, (32, 32)) // 16
    img = Image.fromarray(np.broadcast_to(grad, (32, 32, 3)).astype(np.uint8))
    for name in ops._RAND_AUGMENT_OPS:
        out = ops.rand_augment(img, rng, num_ops=1, ops=(name,), prob=1.0, magnitude=8)
        assert out.size == img.size and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(img)) == (name == "Identity"), name
    for name in ("Brightness", "Sharpness"):
        out = ops.rand_augment(img, rng, num_ops=1, ops=(name,), prob=1.0)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    # Each op is applied with probability 0.5.
    applied = [not np.array_equal(np.asarray(ops.rand_augment(img, rng, num_ops=1,
                                                               ops=("Rotate",))),
                                  np.asarray(img)) for _ in range(400)]
    assert abs(np.mean(applied) - 0.5) < 0.1


def test_normalize_pixels_is_the_float_formula_for_every_value():
    r, g = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgb = np.stack([r, g, 255 - r], -1).astype(np.uint8)
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    ref = ((x - np.asarray(processing.OPENAI_CLIP_MEAN, np.float32))
           / np.asarray(processing.OPENAI_CLIP_STD, np.float32))
    np.testing.assert_array_equal(processing.normalize_pixels(rgb), ref)


def test_eval_processor_equals_processing_preprocess(tmp_path):
    rgb = _image(7, (70, 50))
    proc = ops.image_processor("blip_image_eval", 32)
    ours = proc(ops.decode(_png(rgb)), np.random.default_rng(0))
    ref = processing.preprocess_images([rgb], 32)[0]
    np.testing.assert_array_equal(ours, ref)
    with pytest.raises(ValueError, match="does not decode"):
        ops.decode(_png(rgb, "JPEG")[:100])
    with pytest.raises(ValueError, match="not one of"):
        ops.image_processor("nope", 32)


def test_train_processor_is_a_crop_of_the_image():
    # A constant image stays constant under crop + flip + resize: normalisation is exact.
    img = Image.new("RGB", (80, 60), (255, 0, 128))
    out = ops.image_processor("blip2_image_train", 24)(img, np.random.default_rng(0))
    ref = processing.normalize_pixels(np.full((1, 1, 3), (255, 0, 128), np.uint8))[0, 0]
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(ref, out.shape), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The grain pipeline
# ------------------------------------------------------------------------------------------------
def _pipe(data_dir, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("image_size", 32)
    kw.setdefault("flip", False)
    sources = kw.pop("sources", [pipeline.Source("blip2_captions/synthetic", "train")])
    return pipeline.Pipeline(sources, data_dir=data_dir, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == object:
            assert list(a[k]) == list(b[k]), k
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pipeline_is_deterministic_and_reshuffles_each_epoch(data_dir):
    a = _take(iter(_pipe(data_dir, seed=1)), 12)
    b = _take(iter(_pipe(data_dir, seed=1)), 12)
    c = _take(iter(_pipe(data_dir, seed=2)), 12)
    for x, y in zip(a, b):
        _same(x, y)
    order = np.concatenate([x["index"] for x in a])
    assert not np.array_equal(order, np.concatenate([x["index"] for x in c]))
    n = SYN["train"]
    epochs = order[:2 * n].reshape(2, n)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))   # each epoch: all, once
    assert not np.array_equal(epochs[0], epochs[1])                   # reshuffled
    assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["text"].shape == (8,)


def test_pipeline_threads_and_workers_give_the_same_batches(data_dir):
    ref = _take(iter(_pipe(data_dir, seed=5, num_threads=1)), 4)
    for kw in (dict(num_threads=4), dict(num_workers=2)):
        for x, y in zip(ref, _take(iter(_pipe(data_dir, seed=5, **kw)), 4)):
            _same(x, y)


@pytest.mark.parametrize("count", [2, 4])
def test_process_sharding_partitions_the_global_batch(data_dir, count):
    glob_ = _take(iter(_pipe(data_dir, seed=3, batch_size=8)), 3)
    parts = [_take(iter(_pipe(data_dir, seed=3, batch_size=8, process_index=p,
                              process_count=count)), 3) for p in range(count)]
    for step in range(3):
        for p in range(count):
            local = parts[p][step]
            assert local["image"].shape[0] == 8 // count
            # Process p holds rows [p·b, (p+1)·b) of each global batch, with the same content.
            b = 8 // count
            for k in ("image", "index", "text"):
                np.testing.assert_array_equal(local[k], glob_[step][k][p * b:(p + 1) * b])
    # Evaluation: one pass, padded to whole batches; the processes' valid rows partition it.
    seen = []
    for p in range(count):
        ev = _pipe(data_dir, sources=[pipeline.Source("blip2_captions/synthetic", "test")],
                   train=False, batch_size=8, process_index=p, process_count=count)
        batches = list(ev)
        assert len(batches) == len(ev) == 3
        for b in batches:
            seen += list(b["index"][b["valid"]])
    assert sorted(seen) == list(range(SYN["test"]))


def test_pipeline_checkpoint_restore_continues_exactly(data_dir):
    for kw in (dict(), dict(num_workers=2)):
        pipe = _pipe(data_dir, seed=7, **kw)
        it = iter(pipe)
        _take(it, 5)                                  # into the second epoch (48 / 8 = 6)
        state = json.loads(json.dumps(it.get_state()))   # JSON-able, as a checkpoint stores it
        expected = _take(it, 4)
        again = iter(_pipe(data_dir, seed=7, **kw))
        again.set_state(state)
        for x, y in zip(expected, _take(again, 4)):
            _same(x, y)


def test_mixture_weights_and_kinds(data_dir):
    sources = [pipeline.Source("blip2_captions/synthetic", "train", weight=3.0),
               pipeline.Source("blip2_captions/synthetic", "val", weight=1.0)]
    batches = _take(iter(_pipe(data_dir, sources=sources, batch_size=16)), 25)
    which = np.concatenate([b["dataset_index"] for b in batches])
    assert abs(np.mean(which == 0) - 0.75) < 0.05
    with pytest.raises(ValueError, match="one dataset kind"):
        _pipe(data_dir, sources=[sources[0], pipeline.Source("blip2_vqa/synthetic", "train")])
    with pytest.raises(FileNotFoundError, match="not found"):
        _pipe(data_dir, sources=[pipeline.Source("blip2_captions/nothing", "train")])
    with pytest.raises(ValueError, match="no split"):
        _pipe(data_dir, sources=[pipeline.Source("blip2_captions/synthetic", "nosplit")])


def _qformer_tokenizer(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_bytes(open(bert_vocab(), "rb").read())
    return processing.load_tokenizer(str(d), "qformer")


def test_pipeline_text_processing_and_tokens(data_dir, tmp_path):
    tok = _qformer_tokenizer(tmp_path)
    spec = pipeline.TextSpec("qformer", tok, "qformer", max_length=12)
    b = next(iter(_pipe(data_dir, texts=[spec], prompt="a photo of ", max_words=6)))
    for text, ids, mask in zip(b["text"], b["qformer_ids"], b["qformer_mask"]):
        assert text.startswith("a photo of ") and len(text.split(" ")) <= 6 + 3
        ref_ids, ref_mask = processing.tokenize_prompts(tok, [text], kind="qformer",
                                                        max_length=12, padding="max_length")
        np.testing.assert_array_equal(ids, ref_ids[0])
        np.testing.assert_array_equal(mask, ref_mask[0])
    assert b["qformer_ids"].dtype == np.int32 and b["qformer_ids"].shape == (8, 12)
    # A training caption is one of the record's captions, LAVIS-cleaned.
    for text, caps in zip(b["text"], b["captions"]):
        assert text[len("a photo of "):] in [processing.pre_caption(c, 6) for c in caps]

    vqa = next(iter(_pipe(data_dir, sources=[pipeline.Source("blip2_vqa/synthetic", "val")],
                          question_template="Question: {} Answer:", texts=[
                              pipeline.TextSpec("qformer", tok, "qformer", 16),
                              pipeline.TextSpec("answer", tok, "qformer", 4, field="answer")])))
    for text, answer, answers in zip(vqa["text"], vqa["answer"], vqa["answers"]):
        # LAVIS `pre_question` keeps "?" (not in its punctuation set).
        assert text.startswith("Question: ") and text.endswith("? Answer:")
        assert answer in answers
    assert vqa["answer_ids"].shape == (8, 4)
    assert set(batch_lib.numeric(vqa)) == {"image", "qformer_ids", "qformer_mask", "answer_ids",
                                          "answer_mask", "image_index", "dataset_index",
                                          "index", "valid"}


def test_bad_records_at_load_are_dropped_counted_and_kept_in_step(tmp_path, caplog):
    good = _png(_image(0, (20, 20)))

    def examples():
        for i in range(10):
            data = good if i not in (3, 7) else good[:60]     # two truncated images
            yield {"image": data, "image_id": f"im{i}", "image_index": i,
                   "captions": [f"caption {i}"], "index": i}
    d = str(tmp_path)
    builders.build(builders.CAPTIONS, "faulty", d, {"train": examples, "test": examples})
    it = iter(_pipe(d, sources=[pipeline.Source("blip2_captions/faulty", "train")],
                    batch_size=4, seed=0))
    batches = _take(it, 4)                     # 16 examples: one epoch and a half
    seen = np.concatenate([b["index"] for b in batches])
    assert 3 not in seen[:8] and 7 not in seen[:8] and len(set(seen[:8])) == 8
    assert 3 not in seen and 7 not in seen
    count, first = pipeline.skipped(it)
    # Each pass over a bad record counts once: 16 good rows read 2 epochs (3 or 4 bad passes,
    # depending on where the last bad record of epoch 2 falls).
    assert count in (3, 4) and len(first) == count
    assert all("does not decode" in f for f in first)
    assert any("im3" in f for f in first) and any("im7" in f for f in first)
    assert caplog.text.count("skipped a bad record") == count
    assert it.get_state()["skipped"] == count
    # Evaluation keeps them as invalid rows, so every process runs the same batches.
    ev = _pipe(d, sources=[pipeline.Source("blip2_captions/faulty", "test")], train=False,
               batch_size=4)
    rows = [(int(i), bool(v)) for b in ev for i, v in zip(b["index"], b["valid"])]
    assert len(rows) == 12                                   # 3 batches of 4: 2 padding rows
    assert sorted(i for i, v in rows if v) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert {3, 7} <= {i for i, v in rows if not v} and sum(not v for _, v in rows) == 4


def test_from_config(data_dir, tmp_path):
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(
        data_dir=data_dir, image_size=32, flip=False,
        train=[dict(name="blip2_captions/synthetic", split="train", weight=1.0)],
        eval=dict(name="blip2_captions/synthetic", split="test"),
        texts=[dict(name="qformer", tokenizer=str(tmp_path), kind="qformer", max_length=8)]))
    (tmp_path / "vocab.txt").write_bytes(open(bert_vocab(), "rb").read())
    b = next(iter(pipeline.from_config(cfg, batch_size=4, seed=0)))
    assert b["qformer_ids"].shape == (4, 8) and b["image"].shape == (4, 32, 32, 3)
    ev = pipeline.from_config(cfg, batch_size=4, train=False, split_key="eval")
    assert len(ev) == 5
    cfg.unknown = 1
    with pytest.raises(KeyError, match="unknown"):
        pipeline.from_config(cfg, batch_size=4)


def test_a_split_with_no_usable_image_refuses_the_build_and_leaves_nothing(tmp_path, image_root,
                                                                           capsys):
    good = _write(tmp_path / "train.json", [{"image": "a.jpg", "caption": "a dog"}])
    bad = _write(tmp_path / "val.json", [{"image": "missing.jpg", "caption": "x"},
                                         {"image": "garbage.png", "caption": "y"}])
    d = str(tmp_path / "out")
    argv = ["captions", "--annotations", good, f"val={bad}", "--image-root", image_root,
            "--data-dir", d, "--name", "mine"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "split 'val' has no usable example (2 skipped" in err and "missing.jpg" in err
    assert not os.path.exists(d) or not os.listdir(d)          # nothing written
    # A rebuild over an existing dataset that fails the same way keeps the old one.
    assert _run(argv[:3] + argv[4:], capsys)[0] == 0
    code, _, err = _run(argv + ["--overwrite"], capsys)
    assert code == 2 and "split 'val'" in err
    src = builders.open_split(d, "blip2_captions/mine", "train")
    assert len(src) == 1
    assert sorted(os.listdir(os.path.dirname(builders.dataset_path(d, "blip2_captions/mine")))) \
        == [builders.VERSION]
