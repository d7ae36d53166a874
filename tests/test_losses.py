"""Losses against direct PyTorch renderings of the LAVIS formulas (LAVIS blip2_qformer.py, blip2_opt.py, blip2_t5.py), including a
simulation of LAVIS's multi-GPU ITC (no-grad gather, DDP gradient averaging)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip2_jax import losses

from hf_ref import rel_err

B, Q, E = 8, 4, 16


def _feats(seed):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(B, Q, E)).astype(np.float32)
    txt = rng.normal(size=(B, E)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    return img, txt


def _lavis_itc_ddp(img, txt, temp, gpus, image_ids=None):
    """LAVIS `Blip2Qformer.forward` ITC on `gpus` simulated ranks: each rank sees its slice,
    gathers the others' features with no gradient, and DDP averages the gradients."""
    b = B // gpus
    grads = {"img": np.zeros_like(img), "txt": np.zeros_like(txt), "temp": 0.0}
    total = 0.0
    for rank in range(gpus):
        sl = slice(rank * b, (rank + 1) * b)
        image_feats = torch.tensor(img, requires_grad=True)
        text_feat = torch.tensor(txt, requires_grad=True)
        t = torch.tensor(temp, requires_grad=True)
        local_img, local_txt = image_feats[sl], text_feat[sl]
        img_all, txt_all = image_feats.detach(), text_feat.detach()   # concat_all_gather
        sim_q2t = torch.matmul(local_img.unsqueeze(1), txt_all.unsqueeze(-1)).squeeze()
        sim_i2t = sim_q2t.max(-1)[0] / t
        sim_t2q = torch.matmul(local_txt.unsqueeze(1).unsqueeze(1),
                               img_all.permute(0, 2, 1)).squeeze()
        sim_t2i = sim_t2q.max(-1)[0] / t
        if image_ids is None:
            targets = torch.arange(rank * b, rank * b + b)
            loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
        else:
            ids = torch.tensor(image_ids)
            pos = torch.eq(ids[sl].view(-1, 1), ids.view(1, -1)).float()
            sim_targets = pos / pos.sum(1, keepdim=True)
            sim_targets = 0.9 * sim_targets + 0.1 * torch.ones_like(sim_targets) / sim_targets.size(1)
            loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
            loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
            loss = (loss_t2i + loss_i2t) / 2
        loss.backward()
        total += loss.item() / gpus
        grads["img"] += image_feats.grad.numpy() / gpus
        grads["txt"] += text_feat.grad.numpy() / gpus
        grads["temp"] += t.grad.item() / gpus
    return total, grads


def _ours_itc(img, txt, temp, image_ids=None):
    def f(img, txt, temp):
        sims = losses.itc_similarities(img, txt, temp)
        return losses.itc_loss(*sims, image_ids=None if image_ids is None
                               else jnp.asarray(image_ids))
    loss, (gi, gt, gtemp) = jax.value_and_grad(f, argnums=(0, 1, 2))(img, txt, jnp.float32(temp))
    return float(loss), {"img": np.asarray(gi), "txt": np.asarray(gt), "temp": float(gtemp)}


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_equals_lavis_ddp_for_any_gpu_count(gpus, with_ids):
    img, txt = _feats(0)
    image_ids = np.array([0, 1, 1, 2, 3, 3, 3, 4]) if with_ids else None
    ref_loss, ref = _lavis_itc_ddp(img, txt, 0.07, gpus, image_ids)
    loss, ours = _ours_itc(img, txt, 0.07, image_ids)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for k in ("img", "txt"):
        assert rel_err(ours[k], ref[k]) < 1e-5, k
    assert abs(ours["temp"] - ref["temp"]) < 1e-5 * abs(ref["temp"])


def test_cross_entropy_equals_torch_with_smoothing_and_ignore():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, (3, 7))
    where = rng.random((3, 7)) > 0.3
    for eps in (0.0, 0.1):
        ref = F.cross_entropy(torch.tensor(logits).reshape(-1, 11),
                              torch.tensor(np.where(where, labels, -100)).reshape(-1),
                              ignore_index=-100, label_smoothing=eps)
        ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                    label_smoothing=eps, where=jnp.asarray(where))
        assert abs(float(ours) - ref.item()) < 1e-6 * abs(ref.item())


def test_itm_negatives_are_never_positives_and_follow_the_softmax():
    img, txt = _feats(2)
    sim_i2t, sim_t2i = losses.itc_similarities(jnp.asarray(img), jnp.asarray(txt), 0.5)
    draw = jax.jit(jax.vmap(lambda k: losses.itm_negatives(k, sim_i2t, sim_t2i)))
    neg_img, neg_txt = draw(jax.random.split(jax.random.PRNGKey(0), 20000))
    assert not np.any(np.asarray(neg_img) == np.arange(B)[None])
    assert not np.any(np.asarray(neg_txt) == np.arange(B)[None])
    # Empirical frequencies equal LAVIS's softmax weights (positives filled with -10000).
    for sims, negs in ((sim_t2i, neg_img), (sim_i2t, neg_txt)):
        weights = F.softmax(torch.tensor(np.asarray(sims)).fill_diagonal_(-10000), dim=1).numpy()
        freq = np.stack([np.bincount(np.asarray(negs)[:, r], minlength=B) for r in range(B)]) / 20000
        assert np.abs(freq - weights).max() < 0.015
    # Retrieval fine-tuning: no item of the same image is drawn.
    ids = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])
    neg_img, neg_txt = jax.vmap(lambda k: losses.itm_negatives(k, sim_i2t, sim_t2i, ids))(
        jax.random.split(jax.random.PRNGKey(1), 2000))
    assert not np.any(np.asarray(ids)[np.asarray(neg_img)] == np.asarray(ids)[None])
    assert not np.any(np.asarray(ids)[np.asarray(neg_txt)] == np.asarray(ids)[None])


def test_itm_negatives_do_not_depend_on_the_mesh():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    img, txt = _feats(3)
    sims = losses.itc_similarities(jnp.asarray(img), jnp.asarray(txt), 0.07)
    key = jax.random.PRNGKey(7)
    ref = jax.jit(losses.itm_negatives)(key, *sims)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    sharded = [jax.device_put(s, NamedSharding(mesh, P("data", None))) for s in sims]
    out = jax.jit(losses.itm_negatives)(key, *sharded)
    for a, b in zip(ref, out):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_itm_pairs_and_loss_equal_lavis():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(B, 5, 6)).astype(np.float32)
    ids = rng.integers(0, 50, (B, 7))
    mask = (rng.random((B, 7)) > 0.2).astype(np.int32)
    neg_img = rng.integers(0, B, B)
    neg_txt = rng.integers(0, B, B)
    images, tids, tmask = losses.itm_pairs(jnp.asarray(emb), jnp.asarray(ids), jnp.asarray(mask),
                                           jnp.asarray(neg_img), jnp.asarray(neg_txt))
    # LAVIS: text_ids_all = [pos, pos, neg]; image_embeds_all = [pos, neg, pos].
    np.testing.assert_array_equal(images, np.concatenate([emb, emb[neg_img], emb]))
    np.testing.assert_array_equal(tids, np.concatenate([ids, ids, ids[neg_txt]]))
    np.testing.assert_array_equal(tmask, np.concatenate([mask, mask, mask[neg_txt]]))
    logits = rng.normal(size=(3 * B, 2)).astype(np.float32)
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    ref = F.cross_entropy(torch.tensor(logits), labels).item()
    assert abs(float(losses.itm_loss(jnp.asarray(logits))) - ref) < 1e-6


def test_itg_loss_equals_lavis():
    rng = np.random.default_rng(5)
    V, T, DEC, PAD = 30, 9, 29, 0
    ids = rng.integers(3, 28, (B, T))
    ids[:, 0] = 1                                   # [CLS]
    lengths = rng.integers(3, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, PAD)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    # LAVIS: decoder_input_ids[:, 0] = [DEC]; labels = pad -> -100; BertLMHeadModel shifts.
    dec = ids.copy()
    dec[:, 0] = DEC
    labels = torch.tensor(dec).masked_fill(torch.tensor(dec) == PAD, -100)
    ref = F.cross_entropy(torch.tensor(logits)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                          label_smoothing=0.1, ignore_index=-100).item()
    dec_ours = losses.itg_inputs(jnp.asarray(ids), DEC)
    np.testing.assert_array_equal(dec_ours, dec)
    ours = losses.itg_loss(jnp.asarray(logits), dec_ours, jnp.asarray(mask))
    assert abs(float(ours) - ref) < 1e-6 * ref


@pytest.mark.parametrize("prompt_length", [0, 3])
def test_opt_lm_loss_equals_lavis(prompt_length):
    rng = np.random.default_rng(6)
    V, T, NQ, PAD = 40, 10, 4, 1
    ids = rng.integers(3, 40, (B, T))
    ids[:, 0] = 2                                   # BOS </s>
    lengths = rng.integers(5, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, PAD)
    full_logits = rng.normal(size=(B, NQ + T, V)).astype(np.float32) * 2
    # LAVIS blip2_opt: targets = ids with pad -> -100, prompt tokens -> -100 when a prompt is set,
    # NQ x -100 for the queries; HF OPT shifts inside (logits[:, :-1] vs labels[:, 1:]).
    targets = torch.tensor(ids).masked_fill(torch.tensor(ids) == PAD, -100)
    if prompt_length:
        targets[:, :prompt_length] = -100
    targets = torch.cat([torch.full((B, NQ), -100), targets], dim=1)
    ref = F.cross_entropy(torch.tensor(full_logits)[:, :-1].reshape(-1, V),
                          targets[:, 1:].reshape(-1), ignore_index=-100).item()
    ours = losses.opt_lm_loss(jnp.asarray(full_logits[:, NQ:]), jnp.asarray(full_logits[:, NQ - 1]),
                              jnp.asarray(ids), jnp.asarray(mask), prompt_length=prompt_length)
    assert abs(float(ours) - ref) < 1e-6 * ref


def test_t5_lm_loss_and_decoder_inputs_equal_hf():
    from transformers import T5Config, T5ForConditionalGeneration
    rng = np.random.default_rng(7)
    V, T = 32, 6
    labels = rng.integers(2, V, (B, T))
    lengths = rng.integers(2, T + 1, B)
    lmask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    labels = np.where(lmask > 0, labels, 0)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    hf = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=8, d_ff=8, num_layers=1,
                                             num_heads=1, d_kv=8, decoder_start_token_id=0))
    torch_labels = torch.tensor(labels).masked_fill(torch.tensor(lmask) == 0, -100)
    ref_dec = hf._shift_right(torch_labels).numpy()
    np.testing.assert_array_equal(
        losses.t5_decoder_inputs(jnp.asarray(labels), jnp.asarray(lmask)), ref_dec)
    ref = F.cross_entropy(torch.tensor(logits).reshape(-1, V), torch_labels.reshape(-1),
                          ignore_index=-100).item()
    ours = losses.t5_lm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(lmask))
    assert abs(float(ours) - ref) < 1e-6 * ref


def test_padded_batch_itc_itm_leave_the_padding_rows_out():
    """A padded batch (valid False rows): ITC equals the real rows' ITC (with and without
    image ids), ITM negatives are never padding rows, ITM's loss averages the real rows' pairs."""
    rng = np.random.default_rng(0)
    b, real = 8, 5
    valid = jnp.asarray([True] * real + [False] * (b - real))
    sim_i2t = jnp.asarray(rng.normal(size=(b, b)) * 5, jnp.float32)
    sim_t2i = jnp.asarray(rng.normal(size=(b, b)) * 5, jnp.float32)
    want = losses.itc_loss(sim_i2t[:real, :real], sim_t2i[:real, :real])
    got = losses.itc_loss(sim_i2t, sim_t2i, valid=valid)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    ids = jnp.asarray([0, 0, 1, 2, 2, 0, 1, 3])
    want = losses.itc_loss(sim_i2t[:real, :real], sim_t2i[:real, :real], image_ids=ids[:real])
    got = losses.itc_loss(sim_i2t, sim_t2i, image_ids=ids, valid=valid)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for seed in range(50):
        neg_image, neg_text = losses.itm_negatives(jax.random.PRNGKey(seed), sim_i2t, sim_t2i,
                                                   valid=valid)
        assert int(jnp.max(neg_image[:real])) < real and int(jnp.max(neg_text[:real])) < real
    logits = jnp.asarray(rng.normal(size=(3 * b, 2)), jnp.float32)
    keep = np.concatenate([np.arange(real), b + np.arange(real), 2 * b + np.arange(real)])
    labels = losses.itm_labels(b)[keep]
    want = losses.cross_entropy(logits[keep], labels)
    np.testing.assert_allclose(float(losses.itm_loss(logits, valid)), float(want), rtol=1e-6)
