"""Stage-1 (ITC, ITM, ITG) and stage-2 (decoder-only LM: OPT, LLaMA; T5 prefix LM) losses: pure
functions of model outputs over the *global* batch (LAVIS `blip2_qformer.py`, `blip2_opt.py`,
`blip2_t5.py`; the BLIP-2 paper §3.1).

Global batch, not per device. LAVIS computes each loss per GPU against features gathered from all
GPUs and averages the gradients (DDP). Here the batch is one global array, sharded or not, so the
same batch gives the same loss on any mesh. The two differ in two places:
- ITC. LAVIS gathers with no gradient, so each direction differentiates only its own modality.
  `itc_loss` reproduces this with `stop_gradient` on the other modality. Its loss and gradients
  equal LAVIS's DDP average for any number of GPUs (tests/test_losses.py simulates the GPUs).
- Token losses (ITG, LM). They are means over the global batch's tokens. LAVIS averages per-GPU
  token means, which weights GPUs with fewer tokens more; the two agree when every GPU holds the
  same number of tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ITC_LABEL_SMOOTHING = 0.1
ITG_LABEL_SMOOTHING = 0.1
MASKED_LOGIT = -10000.0     # LAVIS's fill for positives before sampling ITM negatives
ABSENT_LOGIT = -1e9         # padding rows of a padded batch: never a class, never drawn


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (0 disables a term) and stage-specific options."""
    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0
    lm: float = 1.0
    image_id_itc: bool = False        # COCO retrieval fine-tuning: same-image positives
    prompt_length: int = 0            # OPT / LLaMA: BOS + prompt tokens that are not targets
    dec_token_id: int = 0             # the Q-Former tokenizer's [DEC] id (ITG BOS)
    train_vision: bool = False        # the ViT is trainable (fine-tuning): backprop through it
    itm_image_kv_once: bool = False   # ITM reuses the query pass's image K/V (train/step.py)
    masked_rows: bool = False         # a padded batch: rows with valid False take no part


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0, where=None, classes=None):
    """torch `CrossEntropyLoss(label_smoothing=ε)`: (1-ε)·NLL + ε·mean over classes of -log p,
    averaged over the positions where `where` is true (all if None; 0 when there are none).
    `classes` (bool, broadcast to the logits): the classes that exist (the others are padding
    and take no part). Computed in float32."""
    logits = logits.astype(jnp.float32)
    if classes is not None:
        logits = absent(logits, classes)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing and classes is not None:
        c = jnp.broadcast_to(classes, logp.shape).astype(jnp.float32)
        mean_logp = jnp.sum(logp * c, -1) / jnp.maximum(jnp.sum(c, -1), 1)
    elif label_smoothing:
        mean_logp = jnp.mean(logp, axis=-1)
    per = nll if not label_smoothing else (1 - label_smoothing) * nll - label_smoothing * mean_logp
    if where is None:
        return jnp.mean(per)
    where = where.astype(jnp.float32)
    return jnp.sum(per * where) / jnp.maximum(jnp.sum(where), 1.0)


def absent(logits, present):
    """Logits with the classes not `present` (bool, broadcast) pushed to ABSENT_LOGIT. Additive
    rather than a select: XLA's TPU cost model gives no time estimate for a select on a gathered
    batch mask (measured; see blip2_jax/aot.py)."""
    return logits + (present.astype(logits.dtype) - 1) * -ABSENT_LOGIT


def same_image(image_ids):
    """(B, B) bool: pairs showing the same image (retrieval fine-tuning's positives)."""
    return image_ids[:, None] == image_ids[None, :]


# ------------------------------------------------------------------------------------------------
# Stage 1
# ------------------------------------------------------------------------------------------------
def itc_similarities(image_feats, text_feats, temp):
    """(sim_i2t, sim_t2i), both (B, B) with row = the anchor's own index: the max over queries of
    image·text / temp. In each direction only the anchor's modality carries gradient (LAVIS's
    no-grad all_gather).

    image_feats (B, Q, E) and text_feats (B, E), L2-normalised."""
    image_feats = image_feats.astype(jnp.float32)
    text_feats = text_feats.astype(jnp.float32)
    sim_i2t = jnp.max(jnp.einsum("iqe,te->itq", image_feats,
                                 jax.lax.stop_gradient(text_feats)), axis=-1) / temp
    sim_t2i = jnp.max(jnp.einsum("te,iqe->tiq", text_feats,
                                 jax.lax.stop_gradient(image_feats)), axis=-1) / temp
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t, sim_t2i, image_ids=None, label_smoothing: float = ITC_LABEL_SMOOTHING,
             valid=None):
    """Contrastive loss, the mean of the two directions.

    Without `image_ids`: each pair's own partner is the target, with label smoothing (pre-training).
    With `image_ids`: every item of the same image is a positive (COCO retrieval fine-tuning).
    The targets are then 0.9 · positives / count + 0.1 / B, with no label smoothing.
    valid (B,) bool: a padded batch's real rows; the loss is then the real rows' loss (padding
    rows are neither anchors nor candidates)."""
    b = sim_i2t.shape[0]
    classes = None if valid is None else valid[None, :]
    if image_ids is None:
        labels = jnp.arange(b)
        ce = lambda sim: cross_entropy(sim, labels, label_smoothing=label_smoothing,  # noqa
                                       where=valid, classes=classes)
        return (ce(sim_i2t) + ce(sim_t2i)) / 2
    pos = same_image(image_ids).astype(jnp.float32)
    n = b
    if valid is not None:
        pos = pos * classes.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(valid), 1)
    targets = 0.9 * pos / jnp.maximum(jnp.sum(pos, axis=1, keepdims=True), 1) + 0.1 / n
    if valid is not None:
        targets = targets * classes.astype(jnp.float32)

    def soft_ce(sim):
        if valid is None:
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(sim, axis=1) * targets, axis=1))
        per = -jnp.sum(jax.nn.log_softmax(absent(sim, classes), axis=1) * targets, axis=1)
        return jnp.sum(per * valid.astype(per.dtype)) / n
    return (soft_ce(sim_i2t) + soft_ce(sim_t2i)) / 2


def itm_negatives(rng, sim_i2t, sim_t2i, image_ids=None, valid=None):
    """Hard negatives: (image for each text, text for each image), each (B,) int32 indices.

    Each is drawn from the softmax of the similarities with the positives masked out: the own
    pair, or every item of the same image when `image_ids` is given. No gradient flows. The draw
    is a function of the key and the global arrays only, so it does not depend on the mesh.
    If every candidate is a positive, the draw can return a positive. valid (B,): padding rows
    of a padded batch are never drawn."""
    b = sim_i2t.shape[0]
    mask = jnp.eye(b, dtype=bool) if image_ids is None else same_image(image_ids)
    sim_i2t = jnp.where(mask, MASKED_LOGIT, jax.lax.stop_gradient(sim_i2t))
    sim_t2i = jnp.where(mask, MASKED_LOGIT, jax.lax.stop_gradient(sim_t2i))
    if valid is not None:
        sim_i2t, sim_t2i = absent(sim_i2t, valid[None, :]), absent(sim_t2i, valid[None, :])
    k_img, k_txt = jax.random.split(rng)
    # categorical(logits) samples softmax(logits): torch.multinomial(softmax(sim), 1).
    neg_image = jax.random.categorical(k_img, sim_t2i, axis=-1)
    neg_text = jax.random.categorical(k_txt, sim_i2t, axis=-1)
    return neg_image.astype(jnp.int32), neg_text.astype(jnp.int32)


def itm_pairs(image_embeds, input_ids, attention_mask, neg_image, neg_text):
    """The 3B ITM pairs: images [pos, neg, pos] with texts [pos, pos, neg]. Labels are
    [1]·B + [0]·2B (`itm_labels`)."""
    b = input_ids.shape[0]
    index = jnp.concatenate([jnp.arange(b), neg_image, jnp.arange(b)]).astype(jnp.int32)
    ids = jnp.concatenate([input_ids, input_ids, input_ids[neg_text]], axis=0)
    mask = jnp.concatenate([attention_mask, attention_mask, attention_mask[neg_text]], axis=0)
    return image_embeds[index], ids, mask


def itm_labels(b: int):
    return jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])


def itm_loss(logits, valid=None):
    """CE (no smoothing) of the (3B, 2) logits of `itm_pairs` against `itm_labels`; with valid
    (B,), over the pairs of real rows only."""
    labels = itm_labels(logits.shape[0] // 3)
    if valid is None:
        return cross_entropy(logits, labels)
    # Per block of B pairs, weighted by the rows' validity (not a concatenated mask: XLA's TPU
    # cost model gives no estimate for that program).
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0].reshape(3, -1)
    w = valid.astype(jnp.float32)
    return jnp.sum(nll * w[None, :]) / jnp.maximum(3 * jnp.sum(w), 1.0)


def itg_inputs(input_ids, dec_token_id: int):
    """The Q-Former decoder's input: the text ids with [CLS] replaced by [DEC]."""
    return input_ids.at[:, 0].set(dec_token_id)


def itg_loss(logits, input_ids, attention_mask, label_smoothing: float = ITG_LABEL_SMOOTHING):
    """Q-Former LM loss: logits[:, t] predicts ids[:, t+1] (so [DEC] is never a target and the
    final [SEP] is one); padding ignored; label smoothing 0.1; mean over the global batch's
    target tokens. (A padded batch's padding rows: zero their attention_mask.)"""
    return cross_entropy(logits[:, :-1], input_ids[:, 1:], label_smoothing=label_smoothing,
                         where=attention_mask[:, 1:])


# ------------------------------------------------------------------------------------------------
# Stage 2
# ------------------------------------------------------------------------------------------------
def opt_lm_loss(text_logits, last_query_logits, input_ids, attention_mask,
                prompt_length: int = 0, targets=None):
    """The decoder-only LM loss (OPT, LLaMA: one function for both) over [queries; BOS text
    "\\n" pad]: LAVIS's targets (queries and padding -100, and the first `prompt_length` tokens
    when a prompt is set) under HF's shifted causal-LM CE (mean, no smoothing).

    text_logits (B, T, V): the logits at the text positions (`model.logits`), where position t
        predicts ids[:, t+1].
    last_query_logits (B, V) or None: the logits at the last query position, which predict
        ids[:, 0] (the BOS). With no prompt LAVIS trains this (its quirk); with a prompt, or when
        None is passed, it is not a target.
    prompt_length: the number of BOS + prompt tokens that are not targets (0 = no prompt), the
        same for every row (a caption prompt).
    targets (B, T) or None: a per-row mask of the positions that are targets, on top of the
        above: VQA's [BOS prompt answer EOS pad] rows mark the answer and its EOS only
        (`processing.tokenize_prompt_answer`; LAVIS InstructBLIP's `input_part_targets_len`),
        so each row's prompt, of its own length, is never a target."""
    t = input_ids.shape[1]
    position = jnp.arange(t)
    target_ok = (attention_mask > 0) & (position >= prompt_length)[None, :]
    if targets is not None:
        target_ok = target_ok & (targets > 0)
    logits, labels, where = text_logits[:, :-1], input_ids[:, 1:], target_ok[:, 1:]
    if last_query_logits is not None:
        logits = jnp.concatenate([last_query_logits[:, None], logits], axis=1)
        labels, where = input_ids, target_ok
    return cross_entropy(logits, labels, where=where)


def t5_lm_loss(logits, labels, label_mask):
    """FlanT5 prefix-LM loss: decoder logits (B, T, V) from the shifted-right decoder input,
    against the suffix ids, with padding ignored (LAVIS pad → -100). Mean, no smoothing."""
    return cross_entropy(logits, labels, where=label_mask)


def t5_decoder_inputs(labels, label_mask, decoder_start_token_id: int = 0, pad_token_id: int = 0):
    """T5's `_shift_right`: [start, labels[:-1]] with padding (masked labels) as pad."""
    ids = jnp.where(label_mask > 0, labels, pad_token_id)
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    return jnp.concatenate([start, ids[:, :-1]], axis=1)
