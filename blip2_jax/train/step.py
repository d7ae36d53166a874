"""The training step: one jitted function per stage that computes the stage's losses over the
global batch and applies the optimizer update to the trainable parameters.

    step(state, frozen, batch) -> (state, metrics)      # state donated

Stage 1 (`llm` absent): ITC + ITM + ITG (LAVIS `Blip2Qformer.forward`).
- A frozen ViT runs forward only: its output is a stop_gradient, ln_vision is trainable. A
  trainable ViT (fine-tuning; `LossConfig.train_vision`, which the Trainer sets) is
  differentiated.
- The Q-Former's query pass gives both the ITC features and the query K/V that ITG reuses.
- ITM pairs each text with a hard-negative image and each image with a hard-negative text.
Stage 2 decoder-only (OPT, LLaMA): the projected queries prefix `[BOS] caption "\\n"`; LAVIS's
targets.
Stage 2 T5: the prefix LM. The encoder reads [queries; caption prefix] and the decoder
predicts the caption suffix (`data.pipeline` splits the caption).
VQA fine-tuning runs through the same stage-2 losses (answer generation, the BLIP-2 paper §4.3):
decoder-only LLMs read [queries; BOS prompt answer END] and the loss covers the answer and END
only (the batch's per-row `llm_targets`); T5's encoder reads [queries; prompt] and its decoder
predicts the answer (`target`). A question-aware Q-Former (`Blip2Config.qformer_text_input`)
runs its queries with the prompt's BERT ids (`qformer_ids`) through the bidirectional pass.

The batch: the fields `data.batch` defines (images or cached ViT tokens, `valid`, the indices,
and the stage's tokenized texts: `qformer` in stage 1, `llm` for OPT / LLaMA, `llm` + `target` for
T5; in VQA fine-tuning `llm_targets` for OPT / LLaMA and `qformer` for a question-aware Q-Former).
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from blip2_jax import losses, nn as bnn, sharding
from blip2_jax.config import Blip2Config
from blip2_jax.data import batch as batch_lib
from blip2_jax.data.batch import FEATURES
from blip2_jax.losses import LossConfig
from blip2_jax.models.blip2 import Blip2Module
from blip2_jax.train.state import TrainState, merge

_IMAGE_ID_STRIDE = 1 << 24   # dataset_index * stride + image_index: one id per distinct image


def _vision_tokens(m: Blip2Module, batch: Mapping, train_vision: bool):
    """The ViT's output before ln_vision. A frozen ViT runs forward only (a stop_gradient), or
    not at all when the batch brings its cached output (data/features.py)."""
    if FEATURES in batch:
        if train_vision:
            raise ValueError("a batch of cached ViT features cannot train the ViT")
        h = batch[FEATURES].astype(bnn.dtype_of(m.config.vision.dtype))
    else:
        h = m.vision(batch["image"])
    return h if train_vision else jax.lax.stop_gradient(h)


def _itm_logits_reusing_kv(m: Blip2Module, vision_tokens, query_cache, ids, mask, neg_image,
                           neg_text):
    """The (3B, 2) logits of `losses.itm_pairs`, with the image keys/values of the query pass.

    Two of each row's three pairs show the row's own image (the positive and the hard-negative
    text): they reuse its cross-attention K/V where the row lives. The hard-negative image
    lives on another device: its ViT tokens are fetched before ln_vision (bf16, no gradient;
    `sharding.gather_batch_rows`: only the rows asked for cross the mesh) and projected again.
    A gather of the whole batch's K/V instead would move every cross-attention layer's keys and
    values, and their gradients, across the mesh."""
    b, t = ids.shape
    own_ids = jnp.stack([ids, ids[neg_text]], axis=1).reshape(2 * b, t)
    own_mask = jnp.stack([mask, mask[neg_text]], axis=1).reshape(2 * b, t)
    own_kv = {k: query_cache[f"image_{k}"] for k in ("k", "v")}     # rows 2b, 2b+1: image b
    own_ids, own_mask = sharding.constrain_batch((own_ids, own_mask))
    own = m.itm_logits(None, own_ids, own_mask, image_kv=own_kv,
                       deterministic=False).reshape(b, 2, -1)
    neg_images = sharding.gather_batch_rows(vision_tokens, neg_image)
    neg = m.itm_logits(m.ln_vision(neg_images), ids, mask, deterministic=False)
    return jnp.concatenate([own[:, 0], neg, own[:, 1]], axis=0)


def stage1_losses(m: Blip2Module, batch: Mapping, rng, lc: LossConfig):
    k_itm, _ = jax.random.split(rng)
    ids, mask = batch["qformer_ids"], batch["qformer_mask"]
    vision_tokens = _vision_tokens(m, batch, lc.train_vision)
    image_embeds = m.ln_vision(vision_tokens)
    share_kv = bool(lc.itm and lc.itm_image_kv_once)
    query_out, query_cache = m.query_output(image_embeds, return_query_cache=True,
                                            return_image_kv=share_kv, deterministic=False)
    image_ids = None
    if lc.image_id_itc:
        image_ids = batch["dataset_index"] * _IMAGE_ID_STRIDE + batch["image_index"]
    valid = batch["valid"] if lc.masked_rows else None
    out = {}
    if lc.itc or lc.itm:
        sims = losses.itc_similarities(m.image_features(query_out),
                                       m.text_features(ids, mask, deterministic=False), m.temp)
        out["itc"] = losses.itc_loss(*sims, image_ids=image_ids, valid=valid)
    if lc.itm:
        neg_image, neg_text = losses.itm_negatives(k_itm, *sims, image_ids=image_ids,
                                                   valid=valid)
        if share_kv:
            logits = _itm_logits_reusing_kv(m, vision_tokens, query_cache, ids, mask,
                                            neg_image, neg_text)
        else:
            # Gathered across devices, the 3B pairs would otherwise be replicated everywhere.
            pairs = sharding.constrain_batch(losses.itm_pairs(image_embeds, ids, mask,
                                                              neg_image, neg_text))
            logits = m.itm_logits(*pairs, deterministic=False)
        out["itm"] = losses.itm_loss(logits, valid)
    if lc.itg:
        dec = losses.itg_inputs(ids, lc.dec_token_id)
        out["itg"] = losses.itg_loss(m.itg_logits(query_cache, dec, mask, deterministic=False),
                                     dec, _loss_mask(mask, valid))
    total = sum(getattr(lc, k) * v for k, v in out.items() if getattr(lc, k))
    return total, out


def _loss_mask(mask, valid):
    """A token mask for the loss only: a padded batch's padding rows have no targets."""
    return mask if valid is None else mask * valid[:, None].astype(mask.dtype)


def stage2_losses(m: Blip2Module, batch: Mapping, rng, lc: LossConfig):
    cfg = m.config
    valid = batch["valid"] if lc.masked_rows else None
    question = ((batch[batch_lib.ids("qformer")], batch[batch_lib.mask("qformer")])
                if cfg.qformer_text_input else (None, None))
    query_out, _ = m.query_output(m.ln_vision(_vision_tokens(m, batch, lc.train_vision)),
                                  *question, deterministic=False)
    prefix = m.llm_prefix(query_out)
    ids, mask = batch["llm_ids"], batch["llm_mask"]
    embeds = jnp.concatenate([prefix, m.llm.embed(ids).astype(prefix.dtype)], axis=1)
    full_mask = jnp.concatenate([jnp.ones(prefix.shape[:2], mask.dtype), mask], axis=1)
    if cfg.decoder_only:
        logits = m.decoder_logits(embeds, full_mask, logits_from=cfg.num_query_tokens - 1)
        lm = losses.opt_lm_loss(logits[:, 1:], logits[:, 0], ids, _loss_mask(mask, valid),
                                prompt_length=lc.prompt_length,
                                targets=batch.get(batch_lib.targets("llm")))
    else:
        labels, label_mask = batch["target_ids"], batch["target_mask"]
        dec_in = losses.t5_decoder_inputs(labels, label_mask, cfg.llm.decoder_start_token_id,
                                          cfg.llm.pad_token_id)
        encoded = m.llm.encode(embeds, full_mask)
        logits, _ = m.llm.decode(dec_in, encoded, full_mask, decoder_attention_mask=label_mask)
        lm = losses.t5_lm_loss(logits, labels, _loss_mask(label_mask, valid))
    return lc.lm * lm, {"lm": lm}


def loss_fn(cfg: Blip2Config, lc: LossConfig):
    """(trainable, frozen, batch, rng) -> (total loss, {term: value})."""
    module = Blip2Module(cfg)
    stage = stage1_losses if cfg.llm is None else stage2_losses

    def fn(trainable, frozen, batch, rng):
        k_dropout, k_loss = jax.random.split(rng)
        return module.apply({"params": merge(trainable, frozen)}, batch, k_loss, lc,
                            method=stage, rngs={"dropout": k_dropout})
    return fn


def make_step(cfg: Blip2Config, lc: LossConfig, tx: optax.GradientTransformation,
              schedule: Optional[optax.Schedule] = None, *, skip_nonfinite: bool = False,
              microbatches: int = 1, update_shardings=None):
    """The un-jitted train step (the caller jits with shardings and donation).

    skip_nonfinite: when the loss or the gradients are not finite, keep the params and optimizer
    state unchanged (and count the step) instead of applying the update.
    microbatches: k > 1 runs the batch as k microbatches (a `lax.scan`, gradients summed in
    fp32, loss and gradients averaged), so the activations of only B/k examples are live.
    Microbatch i takes rows i, k + i, 2k + i, ..., so each device's rows stay on it. Stage 1's
    contrastive and hard-negative terms then see the B/k examples of their microbatch.
    update_shardings: (the parameters' shardings, the optimizer state's) when they differ
    (ZeRO-1, `Trainer(zero1=True)`): the gradients are pinned to the parameters' layout, so the
    backward pass keeps its own, then the update runs on the state's slices and the new
    parameters are gathered back."""
    compute = loss_fn(cfg, lc)
    grad_fn = jax.value_and_grad(compute, has_aux=True)

    def accumulated(params, frozen, batch, rng):
        k = microbatches

        def split(x):
            if x.shape[0] % k:
                raise ValueError(f"batch {x.shape[0]} is not divisible by {k} microbatches")
            return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
        micro = jax.tree.map(split, batch)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, terms_shape) = jax.eval_shape(compute, params, frozen, first, rng)
        zeros = lambda tree: jax.tree.map(                                     # noqa: E731
            lambda a: jnp.zeros(a.shape, jnp.float32), tree)

        def body(carry, xs):
            loss_sum, terms_sum, grads_sum = carry
            mb, i = xs
            (loss, terms), grads = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
            add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)  # noqa
            return (loss_sum + loss, add(terms_sum, terms), add(grads_sum, grads)), None
        init = (jnp.zeros((), jnp.float32), zeros(terms_shape), zeros(params))
        (loss, terms, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(k)),
                                               unroll=bnn.scan_unroll(k))
        mean = lambda tree: jax.tree.map(lambda x: x / k, tree)              # noqa: E731
        grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
        return (loss / k, mean(terms)), grads

    def step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(state.rng)
        step_rng = jax.random.fold_in(step_rng, state.step)
        if microbatches > 1:
            (loss, terms), grads = accumulated(state.params, frozen, batch, step_rng)
        else:
            (loss, terms), grads = grad_fn(state.params, frozen, batch, step_rng)
        if update_shardings is None:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        else:
            placed, split = update_shardings
            pin = lambda tree, to: jax.tree.map(                           # noqa: E731
                jax.lax.with_sharding_constraint, tree, to)
            grads = pin(grads, placed)
            old = pin(state.params, split)
            updates, opt_state = tx.update(pin(grads, split), state.opt_state, old)
            params = pin(optax.apply_updates(old, updates), placed)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(                        # noqa: E731
                lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params), "finite": finite}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=rng)
        return new_state, metrics
    return step
