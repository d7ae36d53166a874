"""Pre/post-processing against Hugging Face (image processor, tokenizers) and LAVIS semantics.

Real data: skimage's bundled photos; bert-base-uncased's vocab.txt and GPT-2's BPE files (fetched
by scripts/fetch_test_assets.sh, see tests/assets.py); a SentencePiece model trained here.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers import BlipImageProcessorPil, BertTokenizer, GPT2Tokenizer, T5Tokenizer

from blip2_jax import processing as P
import assets

SURF = "A man riding a wave on top of a surfboard."
SURF_BERT = [101, 1037, 2158, 5559, 1037, 4400, 2006, 2327, 1997, 1037, 14175, 6277, 1012, 102]
SURF_GPT2 = [32, 582, 10311, 257, 6769, 319, 1353, 286, 257, 9053, 3526, 13]   # GPT-2's own ids
TEXTS = [SURF, "a cat", "Question: what is the man holding? Short answer:"]


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def _gradient_alpha(h, w):
    return np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))


PHOTOS = {
    "astronaut": lambda: skimage.data.astronaut(),                    # 512x512 RGB array
    "chelsea": lambda: Image.fromarray(skimage.data.chelsea()),      # 451x300 PIL RGB
    "coffee": lambda: skimage.data.coffee(),                          # 600x400 RGB array
    "rocket": lambda: Image.fromarray(skimage.data.rocket()),        # 640x427 PIL RGB
    "camera_pil_L": lambda: Image.fromarray(skimage.data.camera()),  # greyscale PIL
    "camera_hw1": lambda: skimage.data.camera()[..., None],          # greyscale array
    "rgba_pil": lambda: Image.fromarray(np.dstack([skimage.data.coffee(), _gradient_alpha(400, 600)])),
    "rgba_array": lambda: np.dstack([skimage.data.chelsea(), _gradient_alpha(300, 451)]),
}


def _hf(size):
    return BlipImageProcessorPil(size={"height": size, "width": size})


def _hf_pixels(proc, image):
    return proc(image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [224, 364])
@pytest.mark.parametrize("name", list(PHOTOS))
def test_images_match_hf_pil_processor(name, size):
    image = PHOTOS[name]()
    ours = P.preprocess_images([image], size)
    ref = _hf_pixels(_hf(size), image)
    assert ours.shape == (1, size, size, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-6


def test_grey_2d_array_equals_grey_hw1():
    cam = skimage.data.camera()
    np.testing.assert_array_equal(P.preprocess_images(cam, 224),
                                  P.preprocess_images([cam[..., None]], 224))


def test_batch_of_mixed_inputs(tmp_path):
    path = tmp_path / "rocket.png"
    Image.fromarray(skimage.data.rocket()).save(path)
    images = [skimage.data.astronaut(), Image.fromarray(skimage.data.camera()), str(path), path]
    batch = P.preprocess_images(images, 224)
    assert batch.shape == (4, 224, 224, 3) and batch.dtype == np.float32
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], P.preprocess_images([image], 224)[0])
    # A 4-D uint8 array is a batch.
    stack = np.stack([skimage.data.astronaut()] * 2)
    np.testing.assert_array_equal(P.preprocess_images(stack, 224), batch[[0, 0]])


def test_file_paths_match_hf_load_image(tmp_path):
    """HF loads a path with `load_image`: EXIF orientation applied, alpha dropped."""
    hf = _hf(224)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([skimage.data.coffee(), _gradient_alpha(400, 600)])).save(rgba)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                         # orientation: rotate 90° CW
    Image.fromarray(skimage.data.chelsea()).save(rotated, exif=exif, quality=95)
    for path in (rgba, rotated):
        ours = P.preprocess_images([str(path)], 224)
        assert np.abs(ours - _hf_pixels(hf, str(path))).max() <= 1e-6
    # Without EXIF transposition (LAVIS's loaders) the rotated file is read as stored.
    plain = P.preprocess_images([rotated], 224, exif_transpose=False)
    with Image.open(rotated) as im:
        np.testing.assert_array_equal(plain, P.preprocess_images([im.convert("RGB")], 224))
    assert not np.allclose(plain, P.preprocess_images([rotated], 224))


def test_matches_lavis_blip_image_eval():
    """LAVIS: PIL image .convert("RGB") → torchvision Resize((s, s), BICUBIC) (= PIL bicubic on a
    PIL image) → ToTensor (x / 255) → Normalize, written out with torch ops."""
    import torch   # a test requirement (requirements-test.txt)
    for image in (Image.fromarray(skimage.data.rocket()),
                  Image.fromarray(np.dstack([skimage.data.coffee(), _gradient_alpha(400, 600)]))):
        resized = image.convert("RGB").resize((364, 364), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(P.OPENAI_CLIP_MEAN)[:, None, None]
        std = torch.tensor(P.OPENAI_CLIP_STD)[:, None, None]
        ref = ((x - mean) / std).permute(1, 2, 0).numpy()
        ours = P.preprocess_images([image], 364, alpha="drop")[0]
        assert np.abs(ours - ref).max() <= 1e-6


def test_custom_mean_std_and_rectangular_size():
    img = skimage.data.coffee()
    out = P.preprocess_images([img], (224, 320), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    proc = BlipImageProcessorPil(size={"height": 224, "width": 320}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3)
    assert out.shape == (1, 224, 320, 3)
    assert np.abs(out - _hf_pixels(proc, img)).max() <= 1e-6


def test_bad_images_raise_value_error_naming_the_input(tmp_path):
    good = skimage.data.astronaut()
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a jpeg")
    cases = [
        ([good, str(not_image)], ["image 1", "notes.jpg", "cannot be read"]),
        ([str(tmp_path / "missing.png")], ["image 0", "missing.png", "no such file"]),
        ([good, good, good.astype(np.float32)], ["image 2", "float32", "uint8"]),
        ([good[..., :2]], ["image 0", "(512, 512, 2)"]),
        ([np.zeros((5,), np.uint8)], ["image 0", "(5,)"]),
        ([np.zeros((0, 4, 3), np.uint8)], ["image 0", "empty"]),
        ([good, 42], ["image 1", "int"]),
        ([], ["at least one image"]),
    ]
    for images, words in cases:
        with pytest.raises(ValueError) as err:
            P.preprocess_images(images, 224)
        for w in words:
            assert w in str(err.value), (w, str(err.value))
    with pytest.raises(ValueError, match="alpha"):
        P.preprocess_images([good], 224, alpha="black")


# ------------------------------------------------------------------------------------------------
# Q-Former tokenizer: bert-base-uncased + [DEC]
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    shutil.copy(assets.bert_vocab(), d / "vocab.txt")          # vocab.txt alone: no config
    return d


def test_qformer_tokenizer_real_vocab(bert_dir):
    tok = P.load_tokenizer(bert_dir, "qformer")
    assert tok(SURF).input_ids == SURF_BERT
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == 30522 and len(tok) == 30523
    assert tok.convert_tokens_to_ids("[DEC]") == 30522
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)
    ids, mask = P.tokenize_prompts(tok, [SURF, "a cat"], kind="qformer")
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids[0].tolist() == SURF_BERT
    assert ids[1].tolist() == [101, 1037, 4937, 102] + [0] * 10
    assert mask.sum(1).tolist() == [14, 4]
    assert P.decode(tok, ids) == ["a man riding a wave on top of a surfboard.", "a cat"]


def test_qformer_max_length_and_truncation_match_hf(bert_dir):
    tok = P.load_tokenizer(bert_dir, "qformer")
    long = " ".join(["surfboard"] * 40)
    texts = [SURF, long]
    # Retrieval: padding="max_length", max_length=35; ITM: truncation at 32, pad to longest.
    for kw in (dict(padding="max_length", max_length=35), dict(max_length=32)):
        ids, mask = P.tokenize_prompts(tok, texts, kind="qformer", **kw)
        ref = tok(texts, truncation=True, padding=kw.get("padding", "longest"),
                  max_length=kw["max_length"], return_tensors="np")
        np.testing.assert_array_equal(ids, ref["input_ids"])
        np.testing.assert_array_equal(mask, ref["attention_mask"])
        assert ids.shape == (2, kw["max_length"]) and ids[1, -1] == 102


def test_qformer_subdir_of_a_checkpoint(bert_dir, opt_dir, tmp_path):
    # InstructBLIP-style checkpoint: LLM tokenizer at the root, BERT in qformer_tokenizer/.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(opt_dir, ckpt)
    shutil.copytree(bert_dir, ckpt / "qformer_tokenizer")
    assert P.load_tokenizer(ckpt, "qformer")(SURF).input_ids == SURF_BERT
    assert P.tokenizer_kind(P.load_tokenizer(ckpt, "llm")) == "opt"
    # A saved BERT tokenizer (tokenizer.json, [DEC] kept) loads back the same.
    saved = tmp_path / "saved"
    P.load_tokenizer(bert_dir, "qformer").save_pretrained(saved)
    again = P.load_tokenizer(saved, "qformer")
    assert again(SURF).input_ids == SURF_BERT and again.bos_token_id == 30522


# ------------------------------------------------------------------------------------------------
# OPT tokenizer (GPT-2 byte-level BPE)
# ------------------------------------------------------------------------------------------------
OPT_TOKENIZER_CONFIG = {   # as in Salesforce/blip2-opt-2.7b's tokenizer_config.json
    "add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>", "eos_token": "</s>",
    "errors": "replace", "pad_token": "<pad>", "unk_token": "</s>",
    "tokenizer_class": "GPT2Tokenizer", "processor_class": "Blip2Processor",
}


def _opt_vocab(encoder):
    """An OPT-layout vocab.json from GPT-2's encoder.json: OPT's specials <s>=0, <pad>=1, </s>=2,
    <unk>=3, then GPT-2's tokens shifted by 4 (<|endoftext|> dropped). The merges are OPT's, but
    real OPT ids follow fairseq's dictionary order ("\\n" is 50118 there, 202 here)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token, i in sorted(encoder.items(), key=lambda kv: kv[1]):
        if token != "<|endoftext|>":
            vocab[token] = i + 4
    return vocab


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    encoder_json, vocab_bpe = assets.gpt2_bpe()
    with open(encoder_json, encoding="utf-8") as f:
        vocab = _opt_vocab(json.load(f))
    d = tmp_path_factory.mktemp("opt")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(vocab_bpe, d / "merges.txt")
    (d / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG))
    return d


def test_opt_tokenizer_round_trip_and_left_padding(opt_dir):
    tok = P.load_tokenizer(opt_dir, "llm")
    assert isinstance(tok, GPT2Tokenizer) and P.tokenizer_kind(tok) == "opt"
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (2, 1, 2)
    surf = [2] + [i + 4 for i in SURF_GPT2]
    ids, mask = P.tokenize_prompts(tok, [SURF, "a cat"], kind="llm")
    assert ids[0].tolist() == surf
    cat = [2] + tok("a cat", add_special_tokens=False).input_ids
    assert cat == [2, 64 + 4, 3797 + 4]                   # GPT-2: "a"=64, " cat"=3797
    assert ids[1].tolist() == [1] * (13 - len(cat)) + cat                  # LEFT padded with 1
    assert mask[1].tolist() == [0] * (13 - len(cat)) + [1] * len(cat)
    # = HF's tokenizer call that Blip2Processor makes (minus the <image> placeholders).
    ref = tok(TEXTS, padding=True, padding_side="left", return_tensors="np")
    ids, mask = P.tokenize_prompts(tok, TEXTS, kind="opt")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    # LAVIS training: right padding, truncation at 32 with BOS included.
    ids, _ = P.tokenize_prompts(tok, [SURF * 4, "a"], kind="opt", padding_side="right",
                                max_length=32)
    ref = tok([SURF * 4, "a"], padding=True, truncation=True, max_length=32, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    assert ids.shape == (2, 32) and ids[1, 2:].tolist() == [1] * 30
    # Round trips: encode → decode gives the text back.
    for text in TEXTS + ["  spaces,\tTabs & ünïcödé 🙂"]:
        ids, _ = P.tokenize_prompts(tok, [text], kind="opt")
        assert P.decode(tok, ids) == [text.strip()]


def test_opt_decode_cuts_at_newline_eos(opt_dir):
    tok = P.load_tokenizer(opt_dir, "llm")
    newline = tok("\n", add_special_tokens=False).input_ids
    assert newline == [198 + 4]                    # "Ċ"; 50118 with the real OPT vocab.json
    gen = tok(["a dog on a couch\nextra text", " two cats"], add_special_tokens=False).input_ids
    rows = [gen[0] + [1, 1], gen[1] + newline + [1] * (len(gen[0]) + 1 - len(gen[1]))]
    assert P.decode(tok, np.array(rows), eos_token_id=newline[0], pad_token_id=1) == [
        "a dog on a couch", "two cats"]
    assert P.decode(tok, rows[1]) == ["two cats"]      # 1-D ids, no eos: specials/\n stripped


def test_opt_directory_variants(opt_dir, tmp_path):
    # No tokenizer_config.json: OPT's specials are assumed.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(opt_dir / f, bare / f)
    tok = P.load_tokenizer(bare, "llm")
    assert (tok.bos_token_id, tok.pad_token_id) == (2, 1)
    # tokenizer.json only (what transformers 5 save_pretrained writes).
    saved = tmp_path / "saved"
    P.load_tokenizer(opt_dir, "llm").save_pretrained(saved)
    for f in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        if (saved / f).exists():
            os.remove(saved / f)
    assert os.listdir(saved) == ["tokenizer.json"]
    tok = P.load_tokenizer(saved, "opt")
    ids, _ = P.tokenize_prompts(tok, [SURF], kind="opt")
    assert ids[0].tolist() == [2] + [i + 4 for i in SURF_GPT2]


# ------------------------------------------------------------------------------------------------
# T5 tokenizer (SentencePiece; no real spiece.model ships anywhere: train a tiny one)
# ------------------------------------------------------------------------------------------------
CORPUS = [
    "a man riding a wave on top of a surfboard.", "a cat sitting on a couch next to a remote.",
    "Question: what is in the picture? Short answer: a dog", "two people playing frisbee.",
    "The quick brown fox jumps over the lazy dog!", "A photo of an astronaut holding a flag.",
    "a cup of coffee on a wooden table", "a rocket launching into the blue sky",
    "Question: how many people are there? Answer: three",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("t5")
    # T5's id layout: <pad>=0, </s>=1, <unk>=2, no BOS.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_prefix=str(d / "spiece"), vocab_size=200,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                         "extra_ids": 100}))
    return d


def test_t5_tokenizer_round_trip_and_eos(t5_dir, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    tok = P.load_tokenizer(t5_dir, "llm")
    assert isinstance(tok, T5Tokenizer) and P.tokenizer_kind(tok) == "t5"
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids, mask = P.tokenize_prompts(tok, TEXTS, kind="llm")
    for row, m, text in zip(ids, mask, TEXTS):
        want = sp.encode(text) + [1]                                    # text </s>
        assert row.tolist() == want + [0] * (ids.shape[1] - len(want))  # right padded with 0
        assert m.tolist() == [1] * len(want) + [0] * (ids.shape[1] - len(want))
    ref = tok(TEXTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    ids, mask = P.tokenize_prompts(tok, TEXTS, kind="t5", max_length=8)
    np.testing.assert_array_equal(ids, tok(TEXTS, padding=True, truncation=True, max_length=8,
                                           return_tensors="np")["input_ids"])
    assert ids.shape == (3, 8) and ids[0, -1] == ids[2, -1] == 1    # truncated: </s> kept
    assert (ids[np.arange(3), mask.sum(1) - 1] == 1).all()
    assert P.decode(tok, P.tokenize_prompts(tok, TEXTS, kind="t5")[0], eos_token_id=1) == TEXTS
    # Generated T5 ids start with the decoder start token (pad 0) and stop at </s>.
    gen = np.array([[0] + sp.encode("a cat") + [1, 0, 0]])
    assert P.decode(tok, gen, eos_token_id=1) == ["a cat"]
    # The transformers-5 save (tokenizer.json, no spiece.model) loads to the same ids.
    tok.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "spiece.model").exists()
    again = P.load_tokenizer(tmp_path / "saved", "t5")
    np.testing.assert_array_equal(P.tokenize_prompts(again, TEXTS, kind="t5")[0],
                                  P.tokenize_prompts(tok, TEXTS, kind="t5")[0])


# ------------------------------------------------------------------------------------------------
# Missing or wrong files
# ------------------------------------------------------------------------------------------------
def test_missing_tokenizer_files(tmp_path, bert_dir, opt_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        P.load_tokenizer(empty, "llm")
    msg = str(err.value)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model"):
        assert str(empty / name) in msg.split("Missing:")[1], msg
    with pytest.raises(FileNotFoundError) as err:
        P.load_tokenizer(empty, "qformer")
    msg = str(err.value)
    for p in (empty / "qformer_tokenizer" / "vocab.txt", empty / "qformer_tokenizer" /
              "tokenizer.json", empty / "vocab.txt", empty / "tokenizer.json"):
        assert str(p) in msg.split("Missing:")[1], msg

    half = tmp_path / "half"                              # vocab.json without merges.txt
    half.mkdir()
    shutil.copy(opt_dir / "vocab.json", half / "vocab.json")
    with pytest.raises(FileNotFoundError) as err:
        P.load_tokenizer(half, "llm")
    missing, present = str(err.value).split("Missing:")[1].split("Present:")
    assert str(half / "merges.txt") in missing and str(half / "vocab.json") not in missing
    assert str(half / "vocab.json") in present

    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.load_tokenizer(tmp_path / "nowhere", "llm")
    # An OPT directory holds no Q-Former tokenizer; a BERT one holds no LLM tokenizer.
    with pytest.raises(FileNotFoundError, match="Q-Former"):
        P.load_tokenizer(opt_dir, "qformer")
    saved = tmp_path / "bert_saved"
    BertTokenizer(vocab=str(bert_dir / "vocab.txt")).save_pretrained(saved)
    with pytest.raises(ValueError, match="qformer"):
        P.load_tokenizer(saved, "llm")
    with pytest.raises(ValueError, match="kind"):
        P.load_tokenizer(opt_dir, "bert")
    with pytest.raises(ValueError, match="t5"):
        P.load_tokenizer(opt_dir, "t5")


def test_tokenize_prompts_argument_errors(bert_dir):
    tok = P.load_tokenizer(bert_dir, "qformer")
    with pytest.raises(ValueError, match="max_length"):
        P.tokenize_prompts(tok, ["a"], kind="qformer", padding="max_length")
    with pytest.raises(ValueError, match="kind"):
        P.tokenize_prompts(tok, ["a"], kind="bert")
    with pytest.raises(ValueError, match="Q-Former"):
        P.tokenize_prompts(tok, ["a"], kind="llm")
    with pytest.raises(ValueError, match="strings"):
        P.tokenize_prompts(tok, [], kind="qformer")
    ids, _ = P.tokenize_prompts(tok, "one text", kind="qformer")
    assert ids.shape[0] == 1


# ------------------------------------------------------------------------------------------------
# LAVIS text processors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("A man riding a WAVE on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ('  Two dogs: "playing" (happily)!!\n', "two dogs playing happily"),
    ("It's a dog, isn't it?", "it's a dog, isn't it?"),       # , ? ' are kept
    ("a*b#c~d;e", "a b c d e"),
    ("tabs\t\tand\n\nnewlines", "tabs and newlines"),           # runs of 2+ whitespace → " "
    ("single\ttab", "single\ttab"),                             # a single tab stays
    ("3.5 m tall.", "3 5 m tall"),
])
def test_pre_caption(text, want):
    assert P.pre_caption(text) == want


@pytest.mark.parametrize("text, want", [
    ("What is the man holding?", "what is the man holding?"),   # "?" is kept
    ("What's on the table (left)?  ", "what's on the table left?"),
    ("Is it 3.5 m. tall?", "is it 35 m tall?"),                 # deleted, not replaced
    (" Leading  and double spaces. ", " leading  and double spaces"),
    ('Who said "hi": Bob!', "who said hi bob"),
])
def test_pre_question(text, want):
    assert P.pre_question(text) == want


def test_max_words():
    words = [f"w{i}" for i in range(60)]
    assert P.pre_caption(" ".join(words)) == " ".join(words[:50])
    assert P.pre_question(" ".join(words) + "?", max_words=5) == " ".join(words[:5])
    assert P.pre_caption("a b c", max_words=3) == "a b c"


# ------------------------------------------------------------------------------------------------
# No torch at run time
# ------------------------------------------------------------------------------------------------
def test_runs_without_torch(opt_dir, bert_dir):
    code = f"""
import sys
for name in ("torch", "torchvision"):
    sys.modules[name] = None   # import fails; importlib.util.find_spec gives None
import numpy as np
from blip2_jax import processing as P
x = P.preprocess_images([np.zeros((20, 30, 3), np.uint8)], 16)
tok = P.load_tokenizer({str(opt_dir)!r}, "llm")
ids, mask = P.tokenize_prompts(tok, ["a cat", "a"], kind="opt")
q = P.load_tokenizer({str(bert_dir)!r}, "qformer")
assert P.decode(q, P.tokenize_prompts(q, ["A cat."], kind="qformer")[0]) == ["a cat."]
assert not [m for m in sys.modules if m.startswith("torch") and sys.modules[m] is not None]
print(x.shape, ids.tolist())
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(1, 16, 16, 3)" in out.stdout
