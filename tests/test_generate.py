"""`Blip2.generate` token-identical to HF `Blip2ForConditionalGeneration.generate` (torch fp32,
eager) on tiny random OPT, T5 and LLaMA BLIP-2 models; the HF logits processors / warpers; sampling
reproducibility; compile counts.

The tiny models are re-randomised at a larger scale (std 0.5 OPT and LLaMA, 1.0 T5) so
next-token logits are well separated (no ties decide a test) and the generated text varies from
step to step; the EOS id is a token these models emit (some rows stop early, others run to
max_new_tokens). `test_reference_outputs_are_informative` checks that the HF references really
differ between the settings each test distinguishes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import blip2_jax
import hf_ref
from blip2_jax import generate as gen
from hf_ref import IMAGE_TOKEN, nchw, pixels, text_batch

B, N = 3, 10                     # batch, max_new_tokens of the parity tests
# llm: (re-randomisation seed, std, eos id the model emits)
SETUPS = {"opt": (1, 0.5, 84), "t5": (2, 1.0, 49), "llama": (3, 0.5, 97)}
PAD = {"opt": 1, "t5": 0, "llama": 0}
BOS = {"opt": 2, "llama": 1}     # decoder-only prompts start with it
SECOND_EOS = {"opt": 39, "t5": 44, "llama": 61}   # the "list of EOS ids" case's other id

CASES = {
    "greedy": {},
    "min_new_tokens": dict(min_new_tokens=6),
    "beam3_lp+1": dict(num_beams=3, length_penalty=1.0),
    "beam3_lp-1": dict(num_beams=3, length_penalty=-1.0),
    "beam5_lp+1": dict(num_beams=5, length_penalty=1.0),
    "beam5_lp-1": dict(num_beams=5, length_penalty=-1.0),
    "repetition_penalty": dict(repetition_penalty=1.5),
    "beam3_repetition_penalty": dict(num_beams=3, repetition_penalty=3.0),
    # HF-only knobs through the private `_generate`: early_stopping, a list of EOS ids
    "beam3_early_stop_eos_list": dict(num_beams=3, early_stopping=True, eos_token_id="list"),
    "beam4_never_lp2": dict(num_beams=4, early_stopping="never", length_penalty=2.0),
}


class Pair:
    def __init__(self, llm, tmp_path):
        seed, std, eos = SETUPS[llm]
        self.llm, self.eos, self.pad = llm, eos, PAD[llm]
        self.left = llm != "t5"      # decoder-only: left padding, as HF's processor
        self.hf = hf_ref.randomize(hf_ref.blip2_generation(llm, seed=seed,
                                                           text=dict(eos_token_id=eos)), seed, std)
        self.hf.save_pretrained(tmp_path)
        self.model = blip2_jax.load(tmp_path)
        self.nq = self.model.config.num_query_tokens
        self.pix = pixels(B, seed=3)
        # OPT / LLaMA prompts: BOS + text, left-padded; T5: text + </s>, right-padded (HF
        # conventions)
        ids, mask = text_batch(B, 5, seed=5, lengths=[5, 3, 4],
                               pad_side="left" if self.left else "right", pad_id=self.pad)
        if self.left:
            ids = np.concatenate([np.full((B, 1), self.pad), ids], 1)
            mask = np.concatenate([np.zeros((B, 1), np.int64), mask], 1)
            first = mask.argmax(1)
            ids[np.arange(B), first - 1] = BOS[llm]
            mask[np.arange(B), first - 1] = 1
        else:
            ids = np.concatenate([ids, np.full((B, 1), self.pad)], 1)
            mask = np.concatenate([mask, np.zeros((B, 1), np.int64)], 1)
            last = mask.sum(1)
            ids[np.arange(B), last] = 1
            mask[np.arange(B), last] = 1
        self.ids, self.mask = ids, mask

    def hf_inputs(self, pix, ids, mask):
        args = dict(pixel_values=nchw(pix))
        if ids is not None:
            b = ids.shape[0]
            full = np.concatenate([np.full((b, self.nq), IMAGE_TOKEN), ids], 1)
            fmask = np.concatenate([np.ones((b, self.nq), np.int64), mask], 1)
            if self.left:   # HF's processor pads on the left of the image tokens
                order = np.argsort(fmask == 1, axis=1, kind="stable")
                full = np.take_along_axis(full, order, 1)
                fmask = np.take_along_axis(fmask, order, 1)
            args.update(input_ids=torch.from_numpy(full), attention_mask=torch.from_numpy(fmask))
        return args

    def kwargs(self, case):
        kw = dict(CASES[case])
        if kw.get("eos_token_id") == "list":
            kw["eos_token_id"] = [self.eos, SECOND_EOS[self.llm]]
        return kw

    @functools.lru_cache(maxsize=None)
    def reference(self, case, prompt: bool):
        return self.hf_generate(prompt, **self.kwargs(case))

    def hf_generate(self, prompt: bool, **kw):
        """HF's new tokens (B, N), everything after the first EOS set to the pad id (HF fills
        with pad; T5 beam search fills with EOS because its pad id 0 is falsy)."""
        eos = np.atleast_1d(kw.pop("eos_token_id", self.eos))
        ids, mask = (self.ids, self.mask) if prompt else (None, None)
        with torch.no_grad(), hf_ref.one_torch_thread():
            out = self.hf.generate(**self.hf_inputs(self.pix, ids, mask), max_new_tokens=N,
                                   eos_token_id=eos.tolist(), pad_token_id=self.pad,
                                   **kw).numpy()
        start = 1 if self.llm == "t5" else self.nq + (ids.shape[1] if prompt else 1)
        return normalise(out[:, start:], eos, self.pad)

    def ours(self, case, prompt: bool, **extra):
        kw = self.kwargs(case)
        kw.update(extra)
        args = (self.ids, self.mask) if prompt else ()
        return self.model._generate(self.pix, *args, max_new_tokens=N, **kw)


def normalise(tokens, eos, pad, n=N):
    out = np.full((tokens.shape[0], n), pad, np.int64)
    for r, row in enumerate(tokens):
        for j, tok in enumerate(row[:n]):
            out[r, j] = tok
            if tok in np.atleast_1d(eos):
                break
    return out


def _pair(llm, path):
    pair = Pair(llm, path)
    for case in CASES:
        for prompt in (False, True):
            pair.reference(case, prompt)
    return pair


@pytest.fixture(scope="module", params=sorted(SETUPS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory.mktemp(request.param))


# -- parity with HF -------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [False, True], ids=["no_prompt", "prompt"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf(pair, case, prompt):
    ours = pair.ours(case, prompt)
    ref = pair.reference(case, prompt)
    assert ours.shape == (B, N) and ours.dtype.kind == "i"
    np.testing.assert_array_equal(ours, ref, err_msg=f"{pair.llm} {case} prompt={prompt}")
    # pad after EOS
    np.testing.assert_array_equal(
        ours, normalise(ours, pair.kwargs(case).get("eos_token_id", pair.eos), pair.pad))


def test_reference_outputs_are_informative(pair):
    """The HF references differ where the tests claim to distinguish settings."""
    for prompt in (False, True):
        ref = lambda case: pair.reference(case, prompt)   # noqa: E731
        greedy = ref("greedy")
        stops = (greedy == pair.eos).any(1)
        assert stops.any() and not stops.all(), greedy           # some rows stop, some run on
        assert max(len(set(row)) for row in greedy) >= 4, greedy  # text varies across steps
        assert not np.array_equal(ref("beam3_lp+1"), greedy)
        assert not np.array_equal(ref("beam5_lp+1"), ref("beam5_lp-1"))
        assert not np.array_equal(ref("min_new_tokens"), greedy)
        assert not np.array_equal(ref("repetition_penalty"), greedy)
        assert (ref("beam5_lp-1") == pair.eos).any()
    assert any(not np.array_equal(pair.reference("beam3_repetition_penalty", prompt),
                                  pair.reference("beam3_lp+1", prompt)) for prompt in (False, True))
    # early stopping: True changes the result; "never" does too (OPT, with the prompt)
    eos_list = pair.kwargs("beam3_early_stop_eos_list")["eos_token_id"]
    assert not np.array_equal(pair.reference("beam3_early_stop_eos_list", False),
                              pair.hf_generate(False, num_beams=3, eos_token_id=eos_list))
    if pair.llm == "opt":
        assert not np.array_equal(pair.reference("beam4_never_lp2", True),
                                  pair.hf_generate(True, num_beams=4, length_penalty=2.0))


def test_seen_tokens_match_hf_repetition_penalty(pair):
    """The token set our penalty starts from == what HF's processor penalises at step 0: OPT /
    LLaMA: image token + unmasked prompt tokens (left padding skipped); T5: the decoder start
    token."""
    model = pair.model
    ids, mask = blip2_api_pack(pair)
    seen = np.asarray(model.module.apply({"params": model.params}, jnp.asarray(ids),
                                         jnp.asarray(mask), method="decode_seen_tokens"))
    v = model.config.llm.vocab_size
    if pair.left:
        args = pair.hf_inputs(pair.pix, pair.ids, pair.mask)
        hf_ids, hf_mask = args["input_ids"], args["attention_mask"]
        proc = RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=(hf_mask != 0).int()
                                                .argmax(dim=1))
    else:
        hf_ids = torch.zeros((B, 1), dtype=torch.long)
        proc = RepetitionPenaltyLogitsProcessor(2.0)
    hit = proc(hf_ids, torch.ones((B, v))).numpy() != 1.0
    np.testing.assert_array_equal(seen, hit)


def blip2_api_pack(pair):
    return blip2_jax.api.pack_prompts(pair.ids, pair.mask, left=pair.left,
                                      pad_id=pair.pad)


# -- batching, padding, compilation ----------------------------------------------------------------
def test_rows_alone_equal_batch_and_compile_once(pair):
    """Each row alone (its unpadded prompt) == its row in the batch; one program for all prompt
    lengths of a bucket and for changed traced knobs; a new bucket compiles anew."""
    alone = blip2_jax.Blip2(pair.model.config, pair.model.params, check=False)
    batch = pair.ours("greedy", True)
    for r in range(B):
        keep = pair.mask[r] > 0
        row = alone.generate(pair.pix[r:r + 1], pair.ids[r:r + 1, keep], max_new_tokens=N,
                             eos_token_id=pair.eos)
        np.testing.assert_array_equal(row[0], batch[r])
        assert alone._generate_traces == 2        # prefill + decode loop, traced once
    # the same shapes again, other traced knobs: no new program
    alone.generate(pair.pix[:1], pair.ids[:1, pair.mask[0] > 0], max_new_tokens=N,
                   eos_token_id=pair.eos, min_new_tokens=3, seed=7, length_penalty=0.5)
    assert alone._generate_traces == 2
    if pair.llm == "opt":   # a prompt of 9 tokens: the next bucket (16), one prefill + one loop
        long_ids = np.concatenate([[2], np.arange(10, 18)])[None]
        out = alone.generate(pair.pix[:1], long_ids, max_new_tokens=N, eos_token_id=pair.eos)
        assert out.shape == (1, N) and alone._generate_traces == 4


def test_padding_side_is_normalised(pair):
    """OPT / LLaMA given right padding (T5 given left padding) decodes as with its own side."""
    flipped_ids, flipped_mask = [], []
    for r in range(B):
        keep = pair.mask[r] > 0
        n_pad = int((~keep).sum())
        tokens = pair.ids[r, keep]
        pads = np.full(n_pad, pair.pad)
        flipped_ids.append(np.concatenate([tokens, pads] if pair.left else [pads, tokens]))
        flipped_mask.append(np.concatenate([np.ones(len(tokens)), np.zeros(n_pad)]
                                           if pair.left else
                                           [np.zeros(n_pad), np.ones(len(tokens))]))
    out = pair.model.generate(pair.pix, np.stack(flipped_ids), np.stack(flipped_mask).astype(int),
                              max_new_tokens=N, eos_token_id=pair.eos)
    np.testing.assert_array_equal(out, pair.ours("greedy", True))


def test_no_llm_raises_surface_error():
    stage1 = blip2_jax.Blip2(blip2_jax.get_preset("tiny-stage1"), {}, check=False)
    with pytest.raises(blip2_jax.SurfaceError, match="language model"):
        stage1.generate(pixels(1, size=stage1.config.vision.image_size))


# -- sampling --------------------------------------------------------------------------------------
def test_sampling_reproducible_and_seeded(pair):
    opt = pair
    kw = dict(max_new_tokens=N, eos_token_id=opt.eos, do_sample=True, temperature=1.5)
    a = opt.model.generate(opt.pix, opt.ids, opt.mask, seed=0, **kw)
    np.testing.assert_array_equal(a, opt.model.generate(opt.pix, opt.ids, opt.mask, seed=0, **kw))
    others = [opt.model.generate(opt.pix, opt.ids, opt.mask, seed=s, **kw) for s in (1, 2)]
    assert any(not np.array_equal(a, o) for o in others)
    assert not np.array_equal(a, opt.reference("greedy", True))
    np.testing.assert_array_equal(a, normalise(a, opt.eos, opt.pad))
    # beam sampling (HF's multinomial without replacement): reproducible, seeded
    kb = dict(kw, num_beams=3, temperature=2.0)
    c = opt.model.generate(opt.pix, opt.ids, opt.mask, seed=0, **kb)
    np.testing.assert_array_equal(c, opt.model.generate(opt.pix, opt.ids, opt.mask, seed=0, **kb))
    assert any(not np.array_equal(c, opt.model.generate(opt.pix, opt.ids, opt.mask, seed=s, **kb))
               for s in (1, 2, 3))


def test_sampling_with_top_k_1_is_greedy(pair):
    opt = pair
    for seed in (0, 3):
        out = opt.model.generate(opt.pix, opt.ids, opt.mask, max_new_tokens=N,
                                 eos_token_id=opt.eos, do_sample=True, top_k=1, top_p=0.9,
                                 temperature=0.7, seed=seed)
        np.testing.assert_array_equal(out, opt.reference("greedy", True))


# -- processors and warpers vs HF ------------------------------------------------------------------
def _logits(seed=0, shape=(4, 50)):
    return (np.random.default_rng(seed).normal(size=shape) * 3).astype(np.float32)


def test_processors_match_hf():
    scores = _logits()
    t = torch.from_numpy
    ids = np.random.default_rng(1).integers(0, 50, (4, 9))
    seen = np.zeros((4, 50), bool)
    seen[np.arange(4)[:, None], ids] = True
    np.testing.assert_allclose(
        gen.repetition_penalty(jnp.asarray(scores), jnp.asarray(seen), jnp.float32(1.7)),
        RepetitionPenaltyLogitsProcessor(1.7)(t(ids), t(scores.copy())).numpy(), rtol=1e-6)
    for step, want_blocked in [(2, True), (5, False)]:
        ours = gen.suppress_eos_before_min(jnp.asarray(scores), jnp.int32(step), jnp.int32(5),
                                           (7, 11))
        hf = MinNewTokensLengthLogitsProcessor(3, 5, [7, 11])(t(ids[:, :3 + step]),
                                                              t(scores.copy())).numpy()
        np.testing.assert_array_equal(np.asarray(ours), hf)
        assert np.isneginf(hf[:, [7, 11]]).all() == want_blocked
    np.testing.assert_allclose(gen.temperature_warp(jnp.asarray(scores), jnp.float32(0.6)),
                               TemperatureLogitsWarper(0.6)(None, t(scores.copy())).numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("keep", [1, 3])
def test_warpers_match_hf(keep):
    scores = _logits(2, (6, 40))
    t = torch.from_numpy
    for k in (1, 2, 5, 39, 60):
        ours = np.asarray(gen.top_k_filter(jnp.asarray(scores), k, keep))
        hf = TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, t(scores.copy())).numpy()
        np.testing.assert_array_equal(ours, hf)
    for p in (0.05, 0.3, 0.7, 0.9, 0.999):
        ours = np.asarray(gen.top_p_filter(jnp.asarray(scores), jnp.float32(p), keep))
        hf = TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, t(scores.copy())).numpy()
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(hf))
        np.testing.assert_array_equal(ours[np.isfinite(ours)], hf[np.isfinite(hf)])


def test_warpers_restrict_the_support():
    """A hand-made distribution: which tokens survive top-k / top-p, and sampling never leaves
    the survivors."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x))[0]).tolist())  # noqa: E731
    assert kept(gen.top_k_filter(logits, 2)) == {0, 1}
    assert kept(gen.top_p_filter(logits, jnp.float32(0.4))) == {0}
    assert kept(gen.top_p_filter(logits, jnp.float32(0.7))) == {0, 1}
    assert kept(gen.top_p_filter(logits, jnp.float32(0.9))) == {0, 1, 2}
    assert kept(gen.top_p_filter(logits, jnp.float32(0.4), 2)) == {0, 1}   # min_tokens_to_keep
    filtered = gen.top_p_filter(logits, jnp.float32(0.7))
    draws = np.asarray(jax.random.categorical(jax.random.PRNGKey(0), filtered[0], shape=(4000,)))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03


def test_beam_reorder_and_two_step_top_k_match_their_one_op_forms():
    """The decode loop's TPU forms against the plain ops: the per-beam selects against
    take_along_axis (and numpy), and the two-step top-k against one top-k over the flattened
    beams, ties included (quantised scores make many)."""
    rng = np.random.default_rng(0)
    b, nb, v, k = 3, 4, 37, 8
    x = rng.normal(size=(2, b * nb, 5, 3)).astype(np.float32)          # (L, B * nb, S, D)
    src = rng.integers(0, nb, size=(b, nb))
    rows = jnp.asarray(x).reshape(2, b, nb, 5, 3)
    want = np.stack([x.reshape(2, b, nb, 5, 3)[:, i, src[i]] for i in range(b)], 1)
    np.testing.assert_array_equal(gen._select_beams(rows, jnp.asarray(src), 2), want)
    np.testing.assert_array_equal(gen._reorder_beams(jnp.asarray(x), jnp.asarray(src), 1),
                                  want.reshape(x.shape))

    scores = jnp.asarray(np.round(rng.normal(size=(b * nb, v)) * 2) / 2, jnp.float32)
    top, flat = gen._top_k_over_beams(scores, nb, k)
    want_top, want_flat = jax.lax.top_k(scores.reshape(b, nb * v), k)
    np.testing.assert_array_equal(top, want_top)
    np.testing.assert_array_equal(flat, want_flat)
