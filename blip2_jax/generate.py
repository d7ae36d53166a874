"""Token decoding over a model step function: greedy, sampling and beam search, each one
`jax.lax.while_loop` (no Python per token, one compiled program per static configuration).

Semantics mirror Hugging Face `transformers` 5.x `GenerationMixin` (generation/utils.py and
generation/logits_process.py), which BLIP-2's `Blip2ForConditionalGeneration.generate` calls:

  greedy / sampling     `GenerationMixin._sample`
  beam search           `GenerationMixin._beam_search` with `_get_top_k_continuations`,
                        `_get_running_beams_for_next_iteration`, `_update_finished_beams`,
                        `_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`
                        (do_sample=True there = HF beam sampling, multinomial without replacement,
                        done here with the Gumbel-top-k trick)
  logits processors     in HF's order (`_get_logits_processor`): RepetitionPenaltyLogitsProcessor,
                        MinNewTokensLengthLogitsProcessor, then (sampling only)
                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper.

The model is seen only through

    step_fn(cache, tokens, t) -> (logits, cache)

`tokens` (N,) int32 are the new tokens at generation index `t` (0-based; the caller maps it to an
absolute cache position) and `logits` (N, V) are the next-token logits after them. The caller
prefills the prompt itself and passes the last-position logits (B, V) and the filled cache. Every
leaf of `cache` has the batch on `cache_batch_axis`; for beam search `decode` repeats it to
B * num_beams rows (row b's beams are rows b*num_beams ... b*num_beams + num_beams - 1) and reorders
it by the selected beams every step. Per-row constants the step needs (attention masks, T5 cross
K/V) are closed over by `step_fn` and must already be repeated for beam search.

Output: int32 (B, max_new_tokens), only the new tokens; after EOS (and after a row stops) the pad
id. Beam search returns the best finished hypothesis (num_return_sequences = 1).

Static options (`DecodeOptions`, hashable: they pick the compiled program) vs traced knobs
(`Knobs`: temperature, top_p, repetition_penalty value, min_new_tokens, length-penalty tables,
the seed), so changing a knob never recompiles.

Bit-level details kept from HF: scores in float32; beam bookkeeping with HF's -1e9 constants
added in HF's order; length-penalty denominators `length ** length_penalty` computed as Python
floats then divided in float32. (Exact ties are broken towards the lowest index here, as
torch.argmax does; torch.topk promises no order among ties, so tests use well-separated logits.)
Differences from HF: the output is always max_new_tokens wide and pad-filled (HF crops to the
longest row, and its beam search fills with EOS when the pad id is 0, i.e. T5, because
`pad_token_id or eos_token_id[0]` treats 0 as missing); random draws come from jax.random, not
torch (same distributions, different streams); each loop runs the model once more after the last
chosen token (logits unused) to keep the body branch-free.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9   # HF's "very large negative" for beam bookkeeping (float32, as in HF)

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Static decoding configuration (part of the compile key)."""
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    num_beams: int = 1
    do_sample: bool = False
    top_k: int = 0                        # 0: no top-k warper (HF: top_k None or 0)
    use_top_p: bool = False               # top_p < 1 (HF adds TopPLogitsWarper only then)
    use_repetition_penalty: bool = False  # penalty != 1 (HF adds the processor only then)
    early_stopping: Union[bool, str] = False   # beam search: False, True or "never"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.early_stopping not in (False, True, "never"):
            raise ValueError(f"early_stopping must be False, True or 'never', got "
                             f"{self.early_stopping!r}")


class Knobs(NamedTuple):
    """Traced decoding values (changing them reuses the compiled program)."""
    temperature: jax.Array          # () float32
    top_p: jax.Array                # () float32
    repetition_penalty: jax.Array   # () float32
    min_new_tokens: jax.Array       # () int32
    finished_denominator: jax.Array   # (max_new,) float32: (t + 1) ** length_penalty
    heuristic_denominator: jax.Array  # (max_new,) float32: best hypothetical length ** lp
    seed: jax.Array                 # () uint32: sampling uses jax.random.PRNGKey(seed)


def make_knobs(opts: DecodeOptions, *, temperature: float = 1.0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, min_new_tokens: int = 0,
               length_penalty: float = 1.0, seed: Any = 0) -> Knobs:
    """Knobs for `opts`. The length-penalty denominators are computed as HF does (Python float
    `length ** length_penalty`, then used in float32), so beam scores match bit for bit."""
    n = opts.max_new_tokens
    fin = np.array([float((t + 1) ** length_penalty) for t in range(n)], np.float32)
    # `_check_early_stop_heuristic` after step t: cur_len - prompt_len = t + 1 generated tokens,
    # or the longest possible length when early_stopping == "never" and length_penalty > 0.
    longest = opts.early_stopping == "never" and length_penalty > 0.0
    heur = np.array([float((n if longest else t + 1) ** length_penalty) for t in range(n)],
                    np.float32)
    return Knobs(temperature=np.float32(temperature), top_p=np.float32(top_p),
                 repetition_penalty=np.float32(repetition_penalty),
                 min_new_tokens=np.int32(min_new_tokens), finished_denominator=fin,
                 heuristic_denominator=heur, seed=np.uint32(int(seed) % (1 << 32)))


# ------------------------------------------------------------------------------------------------
# Logits processors and warpers (generation/logits_process.py)
# ------------------------------------------------------------------------------------------------
def repetition_penalty(scores, seen, penalty):
    """RepetitionPenaltyLogitsProcessor: tokens already in the sequence (`seen` (N, V) bool) get
    score * penalty where the score is < 0, score / penalty otherwise."""
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalised, scores)


def suppress_eos_before_min(scores, t, min_new_tokens, eos_ids: Sequence[int]):
    """MinNewTokensLengthLogitsProcessor: EOS -> -inf while fewer than min_new_tokens are out."""
    is_eos = jnp.isin(jnp.arange(scores.shape[-1]), jnp.asarray(eos_ids, jnp.int32))
    return jnp.where(is_eos & (t < min_new_tokens), -jnp.inf, scores)


def temperature_warp(scores, temperature):
    """TemperatureLogitsWarper."""
    return scores / temperature


def top_k_filter(scores, top_k: int, min_tokens_to_keep: int = 1):
    """TopKLogitsWarper: -inf below the k-th largest score (ties with it are kept)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores, top_p, min_tokens_to_keep: int = 1):
    """TopPLogitsWarper: keep the smallest high-probability set with mass >= top_p (scores sorted
    ascending; drop those whose cumulative probability is <= 1 - top_p; always keep the
    `min_tokens_to_keep` largest)."""
    order = jnp.argsort(scores, axis=-1)                      # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove = cum <= (1.0 - top_p)
    v = scores.shape[-1]
    remove = remove & (jnp.arange(v) < v - min_tokens_to_keep)
    inverse = jnp.argsort(order, axis=-1)
    remove = jnp.take_along_axis(remove, inverse, axis=-1)
    return jnp.where(remove, -jnp.inf, scores)


def process_scores(scores, seen, t, opts: DecodeOptions, knobs: Knobs, *,
                   min_tokens_to_keep: int = 1):
    """HF's processor list, in its order, on float32 scores (logits for `_sample`, log-probs for
    `_beam_search`)."""
    if opts.use_repetition_penalty:
        scores = repetition_penalty(scores, seen, knobs.repetition_penalty)
    scores = suppress_eos_before_min(scores, t, knobs.min_new_tokens, opts.eos_token_ids)
    if opts.do_sample:
        scores = temperature_warp(scores, knobs.temperature)
        if opts.top_k:
            scores = top_k_filter(scores, opts.top_k, min_tokens_to_keep)
        if opts.use_top_p:
            scores = top_p_filter(scores, knobs.top_p, min_tokens_to_keep)
    return scores


def _mark(seen, tokens):
    """seen[i, tokens[i]] = True (rows are sequences; out-of-vocab ids are dropped, as HF)."""
    if seen is None:
        return None
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True, mode="drop")


def _is_eos(tokens, opts: DecodeOptions):
    return jnp.isin(tokens, jnp.asarray(opts.eos_token_ids, jnp.int32))


# ------------------------------------------------------------------------------------------------
# Greedy and sampling: GenerationMixin._sample
# ------------------------------------------------------------------------------------------------
class _SampleState(NamedTuple):
    t: jax.Array
    logits: jax.Array
    cache: Any
    out: jax.Array
    unfinished: jax.Array
    seen: Any


def _sample(step_fn: StepFn, cache, logits, seen, opts: DecodeOptions, knobs: Knobs):
    """Greedy (argmax) or multinomial sampling, one token per row per step; a finished row gets
    the pad id (HF: `next_tokens * unfinished + pad * (1 - unfinished)`)."""
    b = logits.shape[0]
    n = opts.max_new_tokens
    rng = jax.random.PRNGKey(knobs.seed)

    def cond(s: _SampleState):
        return (s.t < n) & jnp.any(s.unfinished)

    def body(s: _SampleState):
        scores = process_scores(s.logits.astype(jnp.float32), s.seen, s.t, opts, knobs)
        if opts.do_sample:
            tok = jax.random.categorical(jax.random.fold_in(rng, s.t), scores, axis=-1)
        else:
            tok = jnp.argmax(scores, axis=-1)
        tok = jnp.where(s.unfinished, tok.astype(jnp.int32), jnp.int32(opts.pad_token_id))
        out = jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.t))
        unfinished = s.unfinished & ~_is_eos(tok, opts)
        seen = _mark(s.seen, tok)
        logits, cache = step_fn(s.cache, tok, s.t)
        return _SampleState(s.t + 1, logits, cache, out, unfinished, seen)

    init = _SampleState(jnp.int32(0), logits, cache,
                        jnp.full((b, n), opts.pad_token_id, jnp.int32), jnp.ones((b,), bool), seen)
    return jax.lax.while_loop(cond, body, init).out


# ------------------------------------------------------------------------------------------------
# Beam search: GenerationMixin._beam_search
# ------------------------------------------------------------------------------------------------
class _BeamState(NamedTuple):
    t: jax.Array              # tokens generated so far (cur_len - decoder_prompt_len)
    logits: jax.Array         # (B*nb, V) next-token logits of the running beams
    cache: Any                # (B*nb rows)
    seen: Any                 # (B*nb, V) bool or None
    running_seqs: jax.Array   # (B, nb, T) new tokens of the running beams, pad-filled
    running_scores: jax.Array  # (B, nb) summed log-probs (running_beam_scores)
    seqs: jax.Array           # (B, nb, T) finished hypotheses (sequences)
    scores: jax.Array         # (B, nb) their length-penalised scores (beam_scores)
    is_finished: jax.Array    # (B, nb) is_sent_finished
    unsatisfied: jax.Array    # (B, 1) is_early_stop_heuristic_unsatisfied
    done: jax.Array           # () this_peer_finished


def _along(idx, axis: int, ndim: int):
    """idx (B, K') shaped to index an ndim array with B on axis - 1 and K on `axis`."""
    return idx.reshape((1,) * (axis - 1) + idx.shape + (1,) * (ndim - axis - 1))


def _gather(x, idx, axis: int = 1):
    """HF `_gather_beams`: x (..., B, K, ...) indexed on `axis` (K) by idx (B, K'). mode="clip"
    (in range by construction): XLA:CPU's default "fill" masks every element."""
    return jnp.take_along_axis(x, _along(idx, axis, x.ndim), axis=axis, mode="clip")


def _top_k_over_beams(scores, nb: int, k: int):
    """`jax.lax.top_k` of each row's nb beams' scores flattened, (B * nb, V) -> (B, k) values
    and flat indices beam * V + token, in two steps: the k best of each beam, then the k best
    of those nb * k. The same result, ties included (both keep the lower flat index first). Why:
    on TPU, one top-k over (B, nb * V) lays the few rows out on the padded minor axis (XLA's TPU
    cost model, OPT-2.7B beam 5: 2.5 M cycles a decode step; the two steps cost ~0)."""
    bn, v = scores.shape
    top, token = jax.lax.top_k(scores, k)                              # (B * nb, k)
    flat = (jnp.arange(bn, dtype=token.dtype)[:, None] % nb) * v + token
    top, pos = jax.lax.top_k(top.reshape(bn // nb, nb * k), k)
    return top, jnp.take_along_axis(flat.reshape(bn // nb, nb * k), pos, axis=1)


def _reorder_beams(x, src_beam, axis: int):
    """x with its (B * nb) rows on `axis` replaced by beam `src_beam[i, j]` of row i.

    The rows are split as (B, nb) so the reorder stays within each batch row: a batch sharded
    over devices stays local (indexing the flat B * nb axis made XLA all-gather the whole KV
    cache every step). CPU/GPU: one gather; TPU, where XLA lowers that gather to a loop over
    the rows: nb selects (`_select_beams`)."""
    b, nb = src_beam.shape
    rows = x.reshape(x.shape[:axis] + (b, nb) + x.shape[axis + 1:])
    gather = lambda r, i: _gather(r, i, axis + 1)                 # noqa: E731
    select = lambda r, i: _select_beams(r, i, axis + 1)           # noqa: E731
    out = jax.lax.platform_dependent(rows, src_beam, cpu=gather, cuda=gather, default=select)
    return out.reshape(x.shape)


def _select_beams(rows, idx, axis: int):
    """`_gather(rows, idx, axis)` for a short `axis` (the beams) as one select per beam:
    XLA's TPU cost model, OPT-2.7B beam 5 on v5p, cache reorder per decode step 19.5 M cycles
    as a gather, 8.6 M as selects."""
    idx = _along(idx, axis, rows.ndim)
    beam = lambda k: jax.lax.slice_in_dim(rows, k, k + 1, axis=axis)   # noqa: E731
    out = jnp.broadcast_to(beam(0), rows.shape)
    for k in range(1, rows.shape[axis]):
        out = jnp.where(idx == k, beam(k), out)
    return out


def _beam_search(step_fn: StepFn, cache, logits, seen, opts: DecodeOptions, knobs: Knobs,
                 cache_batch_axis: int):
    nb, n = opts.num_beams, opts.max_new_tokens
    bn, v = logits.shape
    b = bn // nb
    n_eos = len(opts.eos_token_ids)
    keep = max(2, 1 + n_eos) * nb                          # beams_to_keep
    top_num_beam_mask = jnp.arange(keep) < nb
    early = opts.early_stopping is True
    f32 = jnp.float32
    rng = jax.random.PRNGKey(knobs.seed)

    def cond(s: _BeamState):
        return ~s.done & (s.t < n)

    def body(s: _BeamState):
        t = s.t
        # b. log-probs, processors (on log-probs, as HF), accumulate onto the running scores
        log_probs = jax.nn.log_softmax(s.logits.astype(f32), axis=-1)
        log_probs = process_scores(log_probs, s.seen, t, opts, knobs,
                                   min_tokens_to_keep=n_eos + 1)
        acc = (log_probs.reshape(b, nb, v) + s.running_scores[:, :, None]).reshape(b, nb * v)

        # c. _get_top_k_continuations
        if opts.do_sample:   # multinomial without replacement == Gumbel top-k, then sort by score
            g = jax.random.gumbel(jax.random.fold_in(rng, t), acc.shape, f32)
            _, idx = jax.lax.top_k(acc + g, keep)
            cand = jnp.take_along_axis(acc, idx, axis=1)
            order = jnp.argsort(-cand, axis=1, stable=True)
            cand = jnp.take_along_axis(cand, order, axis=1)
            idx = jnp.take_along_axis(idx, order, axis=1)
        else:
            cand, idx = _top_k_over_beams(acc.reshape(b * nb, v), nb, keep)
        cand_beam = idx // v
        cand_tok = (idx % v).astype(jnp.int32)
        cand_seqs = _gather(s.running_seqs, cand_beam)
        cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_tok[:, :, None], (0, 0, t))

        # d. stopping criteria per candidate: EOS, or max length reached
        hits = _is_eos(cand_tok, opts) | (t + 1 >= n)

        # e. _get_running_beams_for_next_iteration
        running_lp = cand + hits.astype(f32) * NEG
        _, nxt = jax.lax.top_k(running_lp, nb)
        running_seqs = _gather(cand_seqs, nxt)
        running_scores = _gather(running_lp, nxt)
        src_beam = _gather(cand_beam, nxt)
        next_tok = _gather(cand_tok, nxt)

        # f. _update_finished_beams
        just_finished = hits & top_num_beam_mask[None, :]
        fin = cand / knobs.finished_denominator[t]
        full = jnp.all(s.is_finished, axis=-1, keepdims=True) & early
        fin = fin + full.astype(f32) * NEG
        fin = fin + (~s.unsatisfied).astype(f32) * NEG
        fin = fin + (~just_finished).astype(f32) * NEG
        merged_seqs = jnp.concatenate([s.seqs, cand_seqs], axis=1)
        merged_scores = jnp.concatenate([s.scores, fin], axis=1)
        merged_finished = jnp.concatenate([s.is_finished, just_finished], axis=1)
        _, top = jax.lax.top_k(merged_scores, nb)
        seqs = _gather(merged_seqs, top)
        scores = _gather(merged_scores, top)
        is_finished = _gather(merged_finished, top)

        # g. reorder the cache (and the repetition-penalty token sets) by the chosen beams, feed
        #    the chosen tokens
        cache = jax.tree.map(lambda x: _reorder_beams(x, src_beam, cache_batch_axis), s.cache)
        flat_tok = next_tok.reshape(-1)
        seen = None if s.seen is None else _mark(_reorder_beams(s.seen, src_beam, 0), flat_tok)
        logits, cache = step_fn(cache, flat_tok, t)

        # _check_early_stop_heuristic and _beam_search_has_unfinished_sequences
        best_running = running_scores[:, :1] / knobs.heuristic_denominator[t]
        worst_finished = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), f32(NEG))
        unsatisfied = s.unsatisfied & jnp.any(best_running > worst_finished, axis=-1,
                                              keepdims=True)
        go_on = (jnp.any(unsatisfied) & ~(jnp.all(is_finished) & early) & ~jnp.all(hits))
        return _BeamState(t + 1, logits, cache, seen, running_seqs, running_scores, seqs, scores,
                          is_finished, unsatisfied, ~go_on)

    pad_seqs = jnp.full((b, nb, n), opts.pad_token_id, jnp.int32)
    running_scores = jnp.zeros((b, nb), f32).at[:, 1:].set(NEG)
    init = _BeamState(jnp.int32(0), logits, cache, seen, pad_seqs, running_scores, pad_seqs,
                      jnp.full((b, nb), NEG, f32), jnp.zeros((b, nb), bool),
                      jnp.ones((b, 1), bool), jnp.bool_(False))
    return jax.lax.while_loop(cond, body, init).seqs[:, 0]


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def repeat_batch(tree, n: int, axis: int = 0):
    """Every leaf repeated n times on `axis` (row b -> rows b*n .. b*n + n - 1)."""
    if n == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=axis), tree)


def decode(step_fn: StepFn, cache, logits, opts: DecodeOptions, knobs: Knobs,
           seen: Optional[jax.Array] = None, *, cache_batch_axis: int = 1) -> jax.Array:
    """New tokens (B, max_new_tokens) int32 after a prefilled prompt.

    logits: (B, V) next-token logits after the prompt; cache: the filled cache for B rows;
    seen: (B, V) bool, the tokens HF's repetition penalty counts in the prompt (needed only
    with `opts.use_repetition_penalty`). Call inside `jax.jit`.
    """
    if opts.use_repetition_penalty and seen is None:
        raise ValueError("repetition penalty needs `seen`, the (B, V) prompt-token sets")
    if not opts.use_repetition_penalty:
        seen = None
    if opts.num_beams == 1:
        return _sample(step_fn, cache, logits, seen, opts, knobs)
    nb = opts.num_beams
    return _beam_search(step_fn, repeat_batch(cache, nb, cache_batch_axis),
                        repeat_batch(logits, nb), repeat_batch(seen, nb), opts, knobs,
                        cache_batch_axis)
