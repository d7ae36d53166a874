"""The high-level inference API (`Blip2.caption / answer / match / similarity / features`, lazy
tokenizers) and the `python -m blip2_jax.predict` command line, against Hugging Face.

Generation: tiny random HF OPT, T5 and LLaMA BLIP-2 models (re-randomised as in
test_generate.py so the text varies) saved with a tokenizer whose vocabulary fits their 100 ids:
a hand-made OPT-layout byte-level BPE (vocab.json + merges.txt, "\\n" = the model's EOS, as 50118
is for BLIP-2 OPT), a SentencePiece model trained here for T5 (`</s>` = EOS) and a hand-made
LLaMA-layout SentencePiece BPE (`LlamaTokenizer`'s tokenizer.json, `</s>` = EOS). The reference
is HF `generate` on the same prompts tokenised by HF's own tokenizer call, decoded with
`batch_decode(..., skip_special_tokens=True)` + strip (LAVIS).
Retrieval: a tiny HF `Blip2ForImageTextRetrieval` whose Q-Former takes the real bert-base-uncased
ids (vocab_size 30523), with the real vocab.txt in its checkpoint directory.
Images: skimage's photos (through `processing.preprocess_images`, PNG files for the CLI).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
import transformers
from PIL import Image

import assets
import blip2_jax
import hf_ref
from blip2_jax import processing as P
from hf_ref import IMAGE_TOKEN, nchw, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8                                  # max_new_tokens of the parity tests
TOL = 1e-5
# llm: (re-randomisation seed, std, EOS id): test_generate.py's OPT model, whose EOS is a token it
# emits on these photos (39, here "\n": some rows stop early, others run to N); T5 keeps its
# natural EOS </s> = 1.
SETUPS = {"opt": (1, 0.5, 39), "t5": (2, 1.0, 1), "llama": (3, 0.5, 48)}
PAD = {"opt": 1, "t5": 0, "llama": 0}
PHOTOS = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]


# ------------------------------------------------------------------------------------------------
# Tiny tokenizers whose ids fit the tiny models (vocab 100)
# ------------------------------------------------------------------------------------------------
OPT_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("o", "n"),
              ("Ġ", "o"), ("a", "t"), ("e", "r"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "s"),
              ("Ġ", "p"), ("o", "t"), ("h", "ot"), ("Ġp", "hot"), ("Ġphot", "o"), ("Ġo", "f"),
              ("Ġ", "d"), ("o", "g"), ("Ġd", "og"), ("Ġ", "w"), ("Ġw", "h"), ("Ġwh", "at"),
              ("Ġ", "i"), ("Ġi", "s")]
OPT_TOKENIZER_CONFIG = {   # Salesforce/blip2-opt-2.7b's
    "add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>", "eos_token": "</s>",
    "errors": "replace", "pad_token": "<pad>", "unk_token": "</s>",
    "tokenizer_class": "GPT2Tokenizer"}


def write_opt_tokenizer(d, newline_id: int) -> None:
    """OPT's layout (<s>=0, <pad>=1, </s>=2, <unk>=3) + 95 byte-level BPE tokens: characters,
    26 merges, "Ċ" ("\\n") at `newline_id`; then "<image>" at 99, the tiny models' image token
    index, which text never tokenises to (as OPT's real <image> lies outside its text vocab)."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:'-") + ["Ġ"]
    tokens = chars + ["".join(m) for m in OPT_MERGES]
    tokens += list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")[:94 - len(tokens)]
    tokens.insert(newline_id - 4, "Ċ")
    tokens.append("<image>")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update((t, 4 + i) for i, t in enumerate(tokens))
    assert len(vocab) == hf_ref.VOCAB and vocab["Ċ"] == newline_id
    assert vocab["<image>"] == IMAGE_TOKEN
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in OPT_MERGES))
    (d / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG))


def write_llama_tokenizer(d, eos_id: int) -> None:
    """LLaMA's layout (<unk>=0, also the pad, <s>=1) + SentencePiece-style BPE pieces ("▁" for a
    space; OPT_MERGES' pieces with "Ġ" → "▁"), `</s>` at `eos_id` (a token the tiny model emits,
    as "\\n" is for OPT); "<image>" at 99 as in `write_opt_tokenizer`."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:'-") + ["\u2581"]
    merges = [(a.replace("Ġ", "\u2581"), b) for a, b in OPT_MERGES]
    tokens = chars + ["".join(m) for m in merges]
    tokens += list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")[:96 - len(tokens)]
    tokens.insert(eos_id - 2, "</s>")
    vocab = {"<unk>": 0, "<s>": 1}
    vocab.update((t, 2 + i) for i, t in enumerate(tokens + ["<image>"]))
    assert len(vocab) == hf_ref.VOCAB and vocab["</s>"] == eos_id
    assert vocab["<image>"] == IMAGE_TOKEN
    transformers.LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<unk>",
                                add_bos_token=True).save_pretrained(d)


T5_CORPUS = [
    "a man riding a wave on top of a surfboard.", "a cat sitting on a couch next to a remote.",
    "Question: what is in the picture? Short answer: a dog", "two people playing frisbee.",
    "a photo of an astronaut holding a flag.", "a cup of coffee on a wooden table",
    "Question: how many people are there? Answer: three",
    "a rocket launching into the blue sky", "the quick brown fox jumps over the lazy dog!",
    "a woman in a white suit smiling at the camera", "a striped kitten lying on a red blanket",
    "Question: what color is the mug? Short answer: white", "an old camera with a black strap",
    "green leaves and yellow flowers in the garden", "Question: where is the boy? Short answer: beach",
]


def write_t5_tokenizer(d) -> None:
    """A SentencePiece unigram model (<pad>=0, </s>=1, <unk>=2) of (up to) 99 pieces, filled to
    the models' 100 ids with T5's `<extra_id_*>` specials (so no text maps to the tiny models'
    image token 99)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS * 10), model_prefix=str(d / "spiece"), vocab_size=IMAGE_TOKEN,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, minloglevel=2)
    n = spm.SentencePieceProcessor(model_file=str(d / "spiece.model")).get_piece_size()
    assert 80 <= n <= IMAGE_TOKEN
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                         "extra_ids": hf_ref.VOCAB - n}))


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
class GenPair:
    def __init__(self, llm, path):
        seed, std, eos = SETUPS[llm]
        self.llm, self.eos = llm, eos
        self.pad = PAD[llm]
        self.left = llm != "t5"       # decoder-only: prompts left-padded
        self.hf = hf_ref.randomize(hf_ref.blip2_generation(llm, seed=seed,
                                                           text=dict(eos_token_id=eos)), seed, std)
        self.hf.save_pretrained(path)
        {"opt": lambda: write_opt_tokenizer(path, eos), "t5": lambda: write_t5_tokenizer(path),
         "llama": lambda: write_llama_tokenizer(path, eos)}[llm]()
        self.path = path
        self.model = blip2_jax.load(path)
        self.nq = self.model.config.num_query_tokens
        self.tok = P.load_tokenizer(path, "llm")
        self.pix = P.preprocess_images(PHOTOS, self.model.config.vision.image_size)

    def hf_texts(self, prompts, **kw):
        """HF generate on `prompts` (None: HF's default prompt) tokenised by HF's tokenizer call,
        decoded as LAVIS does."""
        b = self.pix.shape[0]
        args = dict(pixel_values=nchw(self.pix))
        if prompts is not None:
            enc = self.tok(prompts, padding=True, return_tensors="np",
                           padding_side="left" if self.left else "right")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            full = np.concatenate([np.full((b, self.nq), IMAGE_TOKEN), ids], 1)
            fmask = np.concatenate([np.ones((b, self.nq), np.int64), mask], 1)
            if self.left:     # left padding before the image tokens
                order = np.argsort(fmask == 1, axis=1, kind="stable")
                full = np.take_along_axis(full, order, 1)
                fmask = np.take_along_axis(fmask, order, 1)
            args.update(input_ids=torch.from_numpy(full), attention_mask=torch.from_numpy(fmask))
        with torch.no_grad(), hf_ref.one_torch_thread():
            out = self.hf.generate(**args, eos_token_id=self.eos, pad_token_id=self.pad,
                                   **kw).numpy()
        start = 1 if self.llm == "t5" else self.nq + (1 if prompts is None else ids.shape[1])
        return [t.strip() for t in self.tok.batch_decode(out[:, start:], skip_special_tokens=True)]

    def decode(self, ids):
        return P.decode(self.tok, ids, eos_token_id=self.eos, pad_token_id=self.pad)


@pytest.fixture(scope="module", params=sorted(SETUPS))
def pair(request, tmp_path_factory):
    return GenPair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """(HF Blip2ForImageTextRetrieval over the real BERT ids, our model, HF BertTokenizer)."""
    hf = hf_ref.blip2_retrieval(num_query_tokens=4, seed=2, qformer=dict(vocab_size=30523))
    path = tmp_path_factory.mktemp("retrieval")
    hf.save_pretrained(path)
    shutil.copy(assets.bert_vocab(), path / "vocab.txt")
    tok = transformers.BertTokenizer(vocab=str(path / "vocab.txt"))
    assert tok("a cat").input_ids == [101, 1037, 4937, 102]
    return hf, blip2_jax.load(path), tok


# ------------------------------------------------------------------------------------------------
# caption / answer
# ------------------------------------------------------------------------------------------------
CAPTION_KW = dict(num_beams=5, max_new_tokens=N, min_new_tokens=1, length_penalty=1.0)


@pytest.mark.parametrize("prompt", ["", "a photo of", ["the", "", "a photo of a cat"]])
def test_caption_matches_generate_and_hf(pair, prompt):
    model = pair.model
    caps = model.caption(PHOTOS, prompt, max_new_tokens=N)
    assert isinstance(caps, list) and len(caps) == 3 and all(isinstance(c, str) for c in caps)
    # = our generate + decode (prompt tokenised as the LLM wants; "" = the model's own default)
    prompts = [prompt] * 3 if isinstance(prompt, str) else prompt
    ids, mask = (None, None) if not any(prompts) else \
        P.tokenize_prompts(pair.tok, prompts, kind=pair.llm)
    tokens = model.generate(pair.pix, ids, mask, **CAPTION_KW)
    assert caps == pair.decode(tokens)
    # = HF generate + the same tokenizer, decoded as LAVIS
    assert caps == pair.hf_texts(None if not any(prompts) else prompts, **CAPTION_KW)
    assert any(caps)
    if pair.llm == "opt" and prompt:
        stopped = (tokens == pair.eos).any(1)
        assert stopped.any() and not stopped.all(), "uninformative: EOS in no row or in all rows"


def test_caption_image_inputs(pair, pngs):
    """Arrays, preprocessed pixels, PNG paths and PIL images give the same captions."""
    model = pair.model
    batch = model.caption(PHOTOS, "a photo of", max_new_tokens=N)
    assert model.caption(pair.pix, "a photo of", max_new_tokens=N) == batch
    assert model.caption([str(p) for p in pngs], "a photo of", max_new_tokens=N) == batch
    assert model.caption([Image.fromarray(x) for x in PHOTOS], "a photo of",
                         max_new_tokens=N) == batch
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        model.caption(PHOTOS, ["a", "b"])


QUESTIONS = ["what is this?", "what is the cat doing?", "what is in the cup?"]
VQA_KW = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def test_answer_matches_hf_with_lavis_defaults(pair):
    model = pair.model
    answers = model.answer(PHOTOS, QUESTIONS)
    prompts = [f"Question: {q} Short answer:" for q in QUESTIONS]
    assert answers == pair.hf_texts(prompts, **VQA_KW)
    ids, mask = P.tokenize_prompts(pair.tok, prompts, kind=pair.llm)
    assert answers == pair.decode(model.generate(pair.pix, ids, mask, **VQA_KW))
    # one question for every image; LAVIS's question cleaning on demand; a custom template
    one = model.answer(PHOTOS, QUESTIONS[0])
    assert one == model.answer(PHOTOS, [QUESTIONS[0]] * 3)
    assert model.answer(PHOTOS, "What is THIS?", clean_question=True) == one
    assert model.answer(PHOTOS, prompts, template=None) == answers      # no template: as is


def test_without_image_answers_as_the_llm_alone(pair):
    """`without_image()`: no queries, so the answers are HF's language model's own `generate`
    on the prompt (the answer prior), token for token; the model itself is unchanged."""
    model = pair.model
    blind = model.without_image()
    answers = blind.answer(PHOTOS, QUESTIONS)
    prompts = [f"Question: {q} Short answer:" for q in QUESTIONS]
    for prompt, answer in zip(prompts, answers):
        ids, mask = P.tokenize_prompts(pair.tok, [prompt], kind=pair.llm)
        with torch.no_grad(), hf_ref.one_torch_thread():
            out = pair.hf.language_model.generate(
                input_ids=torch.from_numpy(np.asarray(ids)),
                attention_mask=torch.from_numpy(np.asarray(mask)), eos_token_id=pair.eos,
                pad_token_id=pair.pad, **VQA_KW).numpy()
        start = 1 if pair.llm == "t5" else ids.shape[1]
        assert answer == pair.tok.batch_decode(out[:, start:], skip_special_tokens=True)[0].strip()
    assert model.config.num_query_tokens > 0 and model.answer(PHOTOS, QUESTIONS) != answers


# ------------------------------------------------------------------------------------------------
# match / similarity / features (stage 1)
# ------------------------------------------------------------------------------------------------
TEXTS = ["A man riding a WAVE on top of a surfboard!", "a cat (sleeping) on a couch.",
         "two cups of coffee; " + "very " * 40 + "hot"]      # the last is > 35 tokens


def _hf_retrieval(hf, pix, tok, texts, itm: bool, **tok_kw):
    enc = tok(texts, return_tensors="pt", **tok_kw)
    with torch.no_grad(), hf_ref.one_torch_thread():
        out = hf(pixel_values=nchw(pix), input_ids=enc["input_ids"],
                 attention_mask=enc["attention_mask"], use_image_text_matching_head=itm)
    return out


@pytest.mark.parametrize("clean_text", [True, False])
def test_match_and_similarity_match_hf(retrieval, clean_text):
    hf, model, tok = retrieval
    pix = P.preprocess_images(PHOTOS, model.config.vision.image_size)
    ref_texts = [P.pre_caption(t) for t in TEXTS] if clean_text else TEXTS
    # ITM: softmax[:, 1] of image b with text b; texts truncated at 32, padded to the longest
    probs = model.match(PHOTOS, TEXTS, clean_text=clean_text)
    ref = _hf_retrieval(hf, pix, tok, ref_texts, True, truncation=True, max_length=32,
                        padding=True).logits_per_image.softmax(-1)[:, 1].numpy()
    assert probs.shape == (3,) and probs.dtype == np.float32
    assert np.abs(probs - ref).max() <= 1e-6 and 0 < probs.min() and probs.max() < 1
    # ITC: (B_img, B_txt) cosine, texts padded/truncated to 35
    sims = model.similarity(PHOTOS[:2], TEXTS, clean_text=clean_text)
    ref = _hf_retrieval(hf, pix[:2], tok, ref_texts, False, truncation=True, max_length=35,
                        padding="max_length").logits_per_image.numpy()
    assert sims.shape == (2, 3) and rel_err(sims, ref) <= TOL
    # the truncation mattered: untruncated text gives another ITM score
    full = _hf_retrieval(hf, pix[2:], tok, ref_texts[2:], True).logits_per_image
    assert abs(full.softmax(-1)[0, 1].item() - probs[2]) > 1e-4


def test_match_broadcasts_and_cleans(retrieval):
    _, model, _ = retrieval
    probs = model.match(PHOTOS[0], TEXTS[:2])                      # one image, two texts
    assert probs.shape == (2,)
    np.testing.assert_allclose(probs, model.match([PHOTOS[0]] * 2, TEXTS[:2]), rtol=1e-6)
    one = model.match(PHOTOS[:2], TEXTS[0])                        # one text, two images
    np.testing.assert_allclose(one, model.match(PHOTOS[:2], [TEXTS[0]] * 2), rtol=1e-6)
    np.testing.assert_allclose(one, model.match(PHOTOS[:2], [P.pre_caption(TEXTS[0])] * 2,
                                                clean_text=False), rtol=1e-6)
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        model.match(PHOTOS, TEXTS[:2])


def test_features_match_lavis_semantics_and_hf(retrieval):
    hf, model, tok = retrieval
    nq, h, e = model.config.num_query_tokens, 32, model.config.embed_dim
    pix = P.preprocess_images(PHOTOS, model.config.vision.image_size)
    texts = [P.pre_caption(t) for t in TEXTS[:2]]

    f = model.features(PHOTOS, mode="image")
    assert sorted(f) == ["image_embeds", "image_embeds_proj"]
    assert f["image_embeds"].shape == (3, nq, h) and f["image_embeds_proj"].shape == (3, nq, e)
    with torch.no_grad():
        vis = hf.vision_model(pixel_values=nchw(pix)).last_hidden_state
        q = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1),
                       encoder_hidden_states=vis,
                       encoder_attention_mask=torch.ones(vis.shape[:2], dtype=torch.long))[0]
        q_proj = torch.nn.functional.normalize(hf.vision_projection(q), dim=-1)
    assert rel_err(f["image_embeds"], q.numpy()) <= TOL
    assert rel_err(f["image_embeds_proj"], q_proj.numpy()) <= TOL
    np.testing.assert_allclose(np.linalg.norm(f["image_embeds_proj"], axis=-1), 1, atol=1e-5)

    f = model.features(texts=TEXTS[:2], mode="text")             # pre_caption + pad to longest
    enc = tok(texts, padding=True, return_tensors="pt")
    t = enc["input_ids"].shape[1]
    assert sorted(f) == ["text_embeds", "text_embeds_proj"]
    assert f["text_embeds"].shape == (2, t, h) and f["text_embeds_proj"].shape == (2, t, e)
    with torch.no_grad():
        txt = hf.qformer(query_embeds=hf.embeddings(input_ids=enc["input_ids"]), query_length=0,
                         attention_mask=enc["attention_mask"])[0]
        txt_proj = torch.nn.functional.normalize(hf.text_projection(txt), dim=-1)
    assert rel_err(f["text_embeds"], txt.numpy()) <= TOL
    assert rel_err(f["text_embeds_proj"], txt_proj.numpy()) <= TOL
    # token 0's projection is the ITC text feature HF returns
    itc = _hf_retrieval(hf, pix[:1], tok, texts, False, padding=True)
    assert rel_err(f["text_embeds_proj"][:, 0], itc.text_embeds.numpy()) <= TOL

    f = model.features(PHOTOS[:2], TEXTS[:2])                     # mode="multimodal" (LAVIS)
    assert sorted(f) == ["multimodal_embeds"] and f["multimodal_embeds"].shape == (2, nq, h)
    itm = _hf_retrieval(hf, pix[:2], tok, texts, True, padding=True)
    assert rel_err(f["multimodal_embeds"], itm.text_model_output[0][:, :nq].numpy()) <= TOL

    with pytest.raises(ValueError, match="needs texts"):
        model.features(PHOTOS, mode="text")
    with pytest.raises(ValueError, match="needs images"):
        model.features(texts=TEXTS, mode="multimodal")
    with pytest.raises(ValueError, match="mode"):
        model.features(PHOTOS, mode="both")


def test_missing_surfaces_raise(pair, retrieval):
    _, stage1, _ = retrieval
    with pytest.raises(blip2_jax.SurfaceError, match="caption"):
        stage1.caption(PHOTOS)
    with pytest.raises(blip2_jax.SurfaceError, match="answer"):
        stage1.answer(PHOTOS, "what?")
    with pytest.raises(blip2_jax.SurfaceError, match="match"):
        pair.model.match(PHOTOS, "a cat")
    with pytest.raises(blip2_jax.SurfaceError, match="similarity"):
        pair.model.similarity(PHOTOS, "a cat")
    with pytest.raises(blip2_jax.SurfaceError, match="Q-Former text input"):
        pair.model.features(texts="a cat", mode="text")
    f = pair.model.features(PHOTOS, mode="image")               # no ITC heads: no projection
    assert sorted(f) == ["image_embeds"]


# ------------------------------------------------------------------------------------------------
# Tokenizers: lazy, explicit, missing
# ------------------------------------------------------------------------------------------------
def test_tokenizers_lazy_explicit_and_missing(pair, retrieval, tmp_path):
    model = blip2_jax.load(pair.path)
    assert model._tokenizer is None and model.checkpoint_dir == str(pair.path)
    assert P.tokenizer_kind(model.tokenizer) == pair.llm and model.tokenizer is model.tokenizer
    # explicit tokenizers: constructor, load(), attribute
    again = blip2_jax.Blip2(model.config, model.params, tokenizer=pair.tok)
    assert again.tokenizer is pair.tok and again.checkpoint_dir is None
    assert blip2_jax.load(pair.path, tokenizer=pair.tok).tokenizer is pair.tok
    from blip2_jax import sharding
    sharded = model.shard(sharding.make_mesh())                # keeps the text side
    assert sharded.tokenizer is model.tokenizer and sharded.checkpoint_dir == model.checkpoint_dir
    bare = blip2_jax.Blip2(model.config, model.params)
    with pytest.raises(ValueError, match="model.tokenizer"):
        bare.caption(PHOTOS)
    bare.tokenizer = pair.tok
    assert bare.tokenizer is pair.tok
    # a model that holds its tokenizer saves it beside the weights (as HF's save_pretrained)
    model.save(tmp_path / "with_tok")
    assert P.tokenizer_kind(blip2_jax.load(tmp_path / "with_tok").tokenizer) == pair.llm
    # a checkpoint without tokenizer files loads; the tokenizer fails on first use, saying why
    blip2_jax.Blip2(model.config, model.params).save(tmp_path / "no_tok")
    weights_only = blip2_jax.load(tmp_path / "no_tok")
    with pytest.raises(FileNotFoundError, match="Missing"):
        weights_only.tokenizer
    with pytest.raises(blip2_jax.SurfaceError):
        weights_only.qformer_tokenizer                     # no Q-Former text input
    _, stage1, _ = retrieval
    assert stage1.qformer_tokenizer.bos_token_id == 30522   # [DEC], the real vocab.txt
    with pytest.raises(blip2_jax.SurfaceError):
        stage1.tokenizer
    stage1_bare = blip2_jax.Blip2(stage1.config, stage1.params)
    with pytest.raises(ValueError, match="qformer_tokenizer"):
        stage1_bare.match(PHOTOS[0], "a cat")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "blip2_jax.predict", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pngs")
    paths = []
    for name, img in zip(("astronaut", "chelsea", "coffee"), PHOTOS):
        paths.append(d / f"{name}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.mark.parametrize("pair", ["opt"], indirect=True)    # one LLM is enough here
def test_cli_end_to_end(pair, pngs):
    out = _cli("--checkpoint", pair.path, *(a for p in pngs for a in ("--image", p)),
               "--question", QUESTIONS[0], "--max-new-tokens", 10, "--num-beams", 5)
    assert out.returncode == 0, out.stderr[-3000:]
    want = pair.model.answer(PHOTOS, QUESTIONS[0])      # PNGs are lossless: the same pixels
    assert any(want)
    assert out.stdout.splitlines() == [f"{p}\t{a}" for p, a in zip(pngs, want)]


@pytest.mark.parametrize("pair", ["opt"], indirect=True)    # one LLM is enough here
def test_cli_errors(pair, pngs, tmp_path):
    missing = tmp_path / "missing.png"
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a png")
    for args, name in [(("--checkpoint", pair.path, "--image", pngs[0], "--image", missing),
                        str(missing)),
                       (("--checkpoint", pair.path, "--image", not_image), str(not_image)),
                       (("--checkpoint", tmp_path / "nowhere", "--image", pngs[0]),
                        str(tmp_path / "nowhere"))]:
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith("python -m blip2_jax.predict: error: ") and name in lines[-1], \
            out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
    out = _cli("--checkpoint", pair.path, "--image", pngs[0], "--prompt", "a", "--question", "b")
    assert out.returncode == 2 and "not allowed with" in out.stderr
