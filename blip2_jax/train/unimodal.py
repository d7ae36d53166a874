"""The unimodal models BLIP-2 freezes, made at toy scale for the demo on the synthetic dataset.

- **Image encoder.** Our ViT is pre-trained by supervised scene parsing: from the patch tokens
  under each of the 9 grid cells it predicts "empty" or the shape × colour × size of the object
  there, and (at a tenth of the weight) from each patch token that patch's place in the grid.
  Without the second task the features lose where things are: a linear probe of the stage-1
  query outputs then finds an object's cell at chance, and captions cannot say where. The
  scenes are rendered fresh from the synthetic generator under a seed of their own, and never
  from the test split's part of scene space (`synthetic.is_held_out`), so neither the test
  images nor their contents are seen. This stands in for EVA-CLIP's
  pre-training.
- **Language model.** Our OPT is pre-trained as a causal LM on text only (`text_corpus`, generated
  under a seed of its own, of scenes outside the test split's part of scene space): each
  document is about one scene, a description (a caption) first,
  then in a random order a paraphrase and questions about the scene with their answers, in the
  paper's prompt (`Question: ... Answer: ...`), each line as `[BOS] line "\\n"` (`document_ids`).
  This is the toy's analogue of an LLM's knowledge: it learns to answer from a description
  that precedes the question, so a soft visual prompt that stands where the description stood
  can be asked about (zero-shot VQA), though the model never saw an image. The tokenizer is the
  synthetic language's byte-level BPE, and every line ends with "\\n", as BLIP-2's OPT captions
  do.

On a dataset of one's own (`make_unimodal_from_dataset`: the demo's `--annotations`) nothing
is known but the training split's images and text, and neither tower may be taught to align the
two, so both objectives need no labels:
- **Image encoder**: masked patches. Half the patches of each training image are blanked; from
  every patch token the ViT predicts that patch's pixels (2x2-pooled) as they were, and (at a
  tenth of the weight) the patch's place in the grid, as above. Visible patches keep what they
  show; blanked ones must be inferred from their context.
- **Language model**: the same causal LM, on documents made of the training split's own text:
  per training image its captions, then its questions with their most frequent answers in the
  paper's prompt (where the dataset has VQA annotations).

`make_unimodal(cfg, out_dir, ...)` (`make_unimodal_from_dataset`) trains both and writes a native
BLIP-2 checkpoint whose `vision/` and `llm/` hold them; the rest is random init and is not meant
to be loaded. Stage-1 and stage-2 configs then take the towers from it (`init.vision`,
`init.llm`).
"""
from __future__ import annotations

import collections
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from blip2_jax import api, processing
from blip2_jax.config import Blip2Config, OPTConfig, VisionConfig
from blip2_jax.data import builders, pipeline, synthetic
from blip2_jax.models import blip2 as blip2_model
from blip2_jax.models.opt import OPT
from blip2_jax.models.vit import VisionTransformer

NUM_CELL_CLASSES = 1 + len(synthetic.SHAPES) * len(synthetic.COLORS) * len(synthetic.SIZES)
_PRETRAIN_SPLIT_SEED = 10_000      # scenes and texts of their own, disjoint from the dataset's


def cell_labels(scene) -> np.ndarray:
    labels = np.zeros(9, np.int32)
    colors = list(synthetic.COLORS)
    for o in scene:
        k = (synthetic.SHAPES.index(o.shape) * len(colors) + colors.index(o.color)) * 2 \
            + synthetic.SIZES.index(o.size)
        labels[o.row * 3 + o.col] = 1 + k
    return labels


def scene_images(n: int, image_size: int, seed: int, render_size: int = 128):
    """(pixels (n, S, S, 3) normalised as the pipeline's eval processor, labels (n, 9))."""
    rng = np.random.default_rng([seed, _PRETRAIN_SPLIT_SEED])
    pixels = np.empty((n, image_size, image_size, 3), np.float32)
    labels = np.empty((n, 9), np.int32)
    for i in range(n):
        scene = synthetic.sample_scene(rng, held_out=False)
        img = Image.fromarray(synthetic.render(scene, rng, render_size))
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels[i] = processing.normalize_pixels(np.asarray(img))
        labels[i] = cell_labels(scene)
    return pixels, labels


class SceneParser(nn.Module):
    """ViT + two heads: the patch tokens under each grid cell, averaged, are classified (what is
    in the cell), and each patch token is classified into its own grid position (where it is), so
    the features keep position as a query's attention pooling in the Q-Former needs it. The patch
    grid must divide into 3x3 cells."""
    vision: VisionConfig

    @nn.compact
    def __call__(self, pixels):
        v = self.vision
        side = v.image_size // v.patch_size
        if side % 3:
            raise ValueError(f"the {side}x{side} patch grid does not split into 3x3 cells")
        h = VisionTransformer(v, name="vision")(pixels)[:, 1:]          # drop the class token
        k = side // 3
        cells = h.reshape(-1, 3, k, 3, k, v.hidden_size).mean(axis=(2, 4)).reshape(-1, 9,
                                                                                 v.hidden_size)
        cells = nn.gelu(nn.Dense(v.hidden_size, name="fc")(nn.LayerNorm(name="ln")(cells)))
        where = nn.Dense(side * side, name="where")(nn.LayerNorm(name="ln_where")(h))
        return nn.Dense(NUM_CELL_CLASSES, name="out")(cells), where


def _fit(loss_fn: Callable, params, batches: Callable, steps: int, lr: float, log, what: str,
         metric: str = "accuracy"):
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps,
                                                                    lr / 20),
                                 b2=0.98, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    t0 = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss, acc = step(params, opt_state, batches(i))
        if (i + 1) % max(1, steps // 5) == 0 or i == 0:
            log(f"  {what} step {i + 1}/{steps}: loss {float(loss):.3f}, {metric} "
                f"{float(acc):.3f} ({time.perf_counter() - t0:.0f} s)")
    return params, float(loss), float(acc)


def pretrain_vision(vision: VisionConfig, *, steps: int, batch_size: int, pool: int, seed: int,
                    lr: float = 1e-3, place_weight: float = 0.1, log=print
                    ) -> tuple[dict, float]:
    """(vision params, last batch's per-cell accuracy). `place_weight`: the weight of the
    patch-place loss beside the cell-content loss: at 1.0 position crowds out content (the
    demo's held-out ITC R@1 fell from about 0.75 to 0.25); at 0.1 both survive."""
    pixels, labels = scene_images(pool, vision.image_size, seed)
    model = SceneParser(vision)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), pixels[:1])["params"])

    def loss_fn(p, batch):
        logits, where = model.apply({"params": p}, batch["pixels"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        loss += place_weight * _place_loss(where)
        return loss, jnp.mean(jnp.argmax(logits, -1) == batch["labels"])

    rng = np.random.default_rng(seed)

    def batches(_):
        idx = rng.integers(0, pool, batch_size)
        return {"pixels": pixels[idx], "labels": labels[idx]}
    params, _, acc = _fit(loss_fn, params, batches, steps, lr, log, "image encoder")
    return params["vision"], acc


def _place_loss(where):
    """Each patch token classified into its own grid position (see `SceneParser`)."""
    patches = jnp.broadcast_to(jnp.arange(where.shape[1]), where.shape[:2])
    return optax.softmax_cross_entropy_with_integer_labels(where, patches).mean()


class MaskedPatches(nn.Module):
    """ViT + two heads on every patch token: the patch's pixels, 2x2-pooled (what it shows),
    and its place in the grid (where it is)."""
    vision: VisionConfig

    @nn.compact
    def __call__(self, pixels):
        v = self.vision
        side = v.image_size // v.patch_size
        h = VisionTransformer(v, name="vision")(pixels)[:, 1:]          # drop the class token
        what = nn.Dense(3 * (v.patch_size // 2) ** 2, name="pixels")(nn.LayerNorm(name="ln")(h))
        where = nn.Dense(side * side, name="where")(nn.LayerNorm(name="ln_where")(h))
        return what, where


def patch_targets(pixels: jnp.ndarray, patch_size: int) -> jnp.ndarray:
    """(B, patches, 3·(p/2)²): each patch's pixels, 2x2-pooled, in the ViT's patch order."""
    b, s, _, c = pixels.shape
    n, q = s // patch_size, patch_size // 2
    x = pixels.reshape(b, n, patch_size, n, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, n, n, q, 2, q, 2, c).mean(axis=(4, 6))
    return x.reshape(b, n * n, q * q * c)


def pretrain_vision_unlabelled(vision: VisionConfig, pixels: np.ndarray, *, steps: int,
                               batch_size: int, seed: int, lr: float = 1e-3,
                               mask_ratio: float = 0.5, place_weight: float = 0.1,
                               log=print) -> tuple[dict, float]:
    """(vision params, the last batch's R² of the blanked patches' pixels) from images alone
    (`pixels`: (N, S, S, 3) normalised as the eval processor does): `MaskedPatches`."""
    model = MaskedPatches(vision)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), pixels[:1])["params"])
    p, side = vision.patch_size, vision.image_size // vision.patch_size

    def loss_fn(params, batch):
        x, blank = batch["pixels"], batch["blank"]                   # blank: (B, side, side)
        keep = 1.0 - jnp.repeat(jnp.repeat(blank, p, axis=1), p, axis=2)[..., None]
        what, where = model.apply({"params": params}, x * keep)
        target = patch_targets(x, p)
        err = jnp.mean((what - target) ** 2, axis=-1)                 # (B, patches)
        blanked = blank.reshape(blank.shape[0], -1)
        r2 = 1.0 - (jnp.sum(err * blanked)
                    / jnp.sum(jnp.var(target, axis=-1, keepdims=False) * blanked + 1e-6))
        return jnp.mean(err) + place_weight * _place_loss(where), r2

    rng = np.random.default_rng(seed)

    def batches(_):
        idx = rng.integers(0, len(pixels), batch_size)
        return {"pixels": pixels[idx],
                "blank": (rng.random((batch_size, side, side)) < mask_ratio).astype(np.float32)}
    params, _, r2 = _fit(loss_fn, params, batches, steps, lr, log, "image encoder",
                         metric="R² of blanked patches")
    return params["vision"], r2


def dataset_images(data_dir: str, name: str, image_size: int, limit: int,
                   split: str = "train") -> np.ndarray:
    """Up to `limit` distinct images of a dataset's split, (N, S, S, 3) normalised by the eval
    processor (`blip_image_eval`, as the demo's stages read them)."""
    source = pipeline.Pipeline([pipeline.Source(name, split)], data_dir=data_dir, batch_size=64,
                               train=False, image_size=image_size,
                               image_processor="blip_image_eval")
    seen: dict[int, np.ndarray] = {}
    for b in source:
        for i, px, ok in zip(b["image_index"], b["image"], b["valid"]):
            if ok:
                seen.setdefault(int(i), px)
        if len(seen) >= limit:
            break
    return np.stack([seen[i] for i in sorted(seen)][:limit])


def dataset_corpus(data_dir: str, name: str, seed: int, questions: int = 4,
                   split: str = "train") -> list[list[str]]:
    """Documents (lists of lines) from a dataset's split, one per image with captions: a caption,
    then in a random order one more caption and up to `questions` of the image's questions with
    their most frequent answer (`qa_line`; blip2_vqa/NAME's, where it exists)."""
    rng = np.random.default_rng([seed, _PRETRAIN_SPLIT_SEED + 1])
    docs = []
    for _, texts in sorted(builders.image_texts(data_dir, name, split).items()):
        if not texts["captions"]:
            continue
        caps = [texts["captions"][i] for i in rng.permutation(len(texts["captions"]))]
        qa = [qa_line(q, collections.Counter(answers).most_common(1)[0][0])
              for q, answers in texts["qa"][:questions]]
        rest = caps[1:2] + qa
        docs.append(caps[:1] + [rest[i] for i in rng.permutation(len(rest))])
    return docs


def text_corpus(n_scenes: int, seed: int, questions: int = 4) -> list[list[str]]:
    """Documents (lists of lines), one scene each: a caption, then a paraphrase and up to
    `questions` question-answer lines (`qa_line`) in a random order."""
    rng = np.random.default_rng([seed, _PRETRAIN_SPLIT_SEED + 1])
    docs = []
    for _ in range(n_scenes):
        scene = synthetic.sample_scene(rng, held_out=False)
        first, second = synthetic.captions(scene, rng, 2)
        rest = [second] + [qa_line(q, a) for q, a in synthetic.questions(scene, rng, questions)]
        docs.append([first] + [rest[i] for i in rng.permutation(len(rest))])
    return docs


def qa_line(question: str, answer: str) -> str:
    return f"{synthetic.VQA_PROMPT.format(question)} {answer}"


def document_ids(tokenizer, documents: list[list[str]], max_length: int):
    """(ids, mask) (N, max_length), right padded: each line as `[BOS] line "\\n"`, a
    document's lines back to back — as OPT's pre-training joins texts with its BOS (</s>).
    Within a document the text before a BOS describes the scene after it, so the LM learns to
    use what precedes BOS: exactly where BLIP-2 puts its soft visual prompt."""
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    ids = np.full((len(documents), max_length), pad, np.int32)
    for row, doc in enumerate(documents):
        toks = [t for line in doc for t in
                [bos] + tokenizer(line + "\n", add_special_tokens=False)["input_ids"]][:max_length]
        ids[row, :len(toks)] = toks
    return ids, (ids != pad).astype(np.int32)


def pretrain_llm(llm: OPTConfig, tokenizer, *, steps: int, batch_size: int,
                 corpus: list[list[str]], max_length: int = 128, seed: int = 0, lr: float = 2e-3,
                 log=print) -> tuple[dict, float]:
    """(llm params, last batch's next-token accuracy). `corpus`: documents (`text_corpus`)."""
    ids, mask = document_ids(tokenizer, corpus, max_length)
    model = OPT(llm)
    init = lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, llm.hidden_size)),  # noqa
                              jnp.ones((1, 4), jnp.int32))
    params = nn.unbox(jax.jit(init)()["params"])

    def loss_fn(p, batch):
        embeds = model.apply({"params": p}, batch["ids"], method=OPT.embed)
        logits, _ = model.apply({"params": p}, embeds, batch["mask"])
        target, where = batch["ids"][:, 1:], batch["mask"][:, 1:]
        per = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], target)
        loss = jnp.sum(per * where) / jnp.sum(where)
        acc = jnp.sum((jnp.argmax(logits[:, :-1], -1) == target) * where) / jnp.sum(where)
        return loss, acc

    rng = np.random.default_rng(seed)

    def batches(_):
        idx = rng.integers(0, len(ids), batch_size)
        return {"ids": ids[idx], "mask": mask[idx]}
    params, _, acc = _fit(loss_fn, params, batches, steps, lr, log, "language model")
    return params, acc


def answer_rows(tokenizer, *, n_scenes: int, seed: int, described: bool,
                max_length: int = 128) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rows (N, max_length) of one question each about fresh scenes of the test split's part of
    scene space (contents the LM never read about; every kind of question there is), as
    documents: the scene's description first (`described`), then the question-answer line; and
    per row the span [start, end) of the answer's tokens and its "\\n"."""
    rng = np.random.default_rng([seed, _PRETRAIN_SPLIT_SEED + 2])
    rows, spans = [], []
    for _ in range(n_scenes):
        scene = synthetic.sample_scene(rng, held_out=True)
        context = [synthetic.captions(scene, rng, 1)[0]] if described else []
        for q, a in synthetic.questions(scene, rng, 6):
            [prompt], [prompt_mask] = document_ids(
                tokenizer, [context + [synthetic.VQA_PROMPT.format(q)]], max_length)
            [full], [full_mask] = document_ids(tokenizer, [context + [qa_line(q, a)]],
                                               max_length)
            rows.append(full)       # the prompt's tokens less its "\n" start the row
            spans.append((int(prompt_mask.sum()) - 1, int(full_mask.sum())))
    return np.stack(rows), spans


def score_answers(predicted: np.ndarray, rows: np.ndarray, spans) -> float:
    """The share of rows whose answer span the next-token predictions (`predicted[:, t]` for
    token t + 1) get entirely right."""
    return float(np.mean([np.array_equal(predicted[i, s - 1:e - 1], rows[i, s:e])
                          for i, (s, e) in enumerate(spans)]))


def answer_accuracy(llm: OPTConfig, params, tokenizer, *, n_scenes: int = 200, seed: int = 1,
                    described: bool = True) -> float:
    """The share of questions about fresh scenes whose whole answer (and its "\\n") the
    language model predicts token by token (teacher-forced argmax), given the scene's
    description before the question (`described`) or the question alone: what the LM knows
    from text, and its answer prior."""
    rows, spans = answer_rows(tokenizer, n_scenes=n_scenes, seed=seed, described=described)
    model = OPT(llm)

    @jax.jit
    def predict(p, ids, mask):
        logits, _ = model.apply({"params": p}, model.apply({"params": p}, ids, method=OPT.embed),
                                mask)
        return jnp.argmax(logits, -1)
    mask = (rows != tokenizer.pad_token_id).astype(np.int32)
    return score_answers(np.asarray(predict(params, rows, mask)), rows, spans)


def make_unimodal(cfg: Blip2Config, out_dir: str, tokenizer, *, vision_steps: int,
                  llm_steps: int, batch_size: int = 64, vision_pool: int = 8000, seed: int = 0,
                  answer_scenes: int = 200, log=print) -> dict:
    """Pre-train both towers on fresh synthetic scenes and text and write them into a native
    checkpoint at `out_dir`; the LM's text-only answers are scored on `answer_scenes` held-out
    scenes."""
    _check_llm(cfg)
    log("pre-training the image encoder (scene parsing on fresh synthetic scenes)")
    vision, vision_acc = pretrain_vision(cfg.vision, steps=vision_steps, batch_size=batch_size,
                                         pool=vision_pool, seed=seed, log=log)
    log("pre-training the language model (causal LM on text: descriptions, questions, answers)")
    llm, llm_acc = pretrain_llm(cfg.llm, tokenizer, steps=llm_steps, batch_size=batch_size,
                                corpus=text_corpus(4000, seed), seed=seed, log=log)
    _save(cfg, vision, llm, out_dir, seed)
    return {"vision_cell_accuracy": vision_acc, "llm_token_accuracy": llm_acc,
            "llm_answers_described": answer_accuracy(cfg.llm, llm, tokenizer,
                                                     n_scenes=answer_scenes),
            "llm_answers_prior": answer_accuracy(cfg.llm, llm, tokenizer, n_scenes=answer_scenes,
                                                 described=False)}


def make_unimodal_from_dataset(cfg: Blip2Config, out_dir: str, tokenizer, *, data_dir: str,
                               name: str, vision_steps: int, llm_steps: int,
                               batch_size: int = 64, vision_pool: int = 8000, seed: int = 0,
                               log=print) -> dict:
    """Pre-train both towers on the training split of blip2_captions/NAME (and blip2_vqa/NAME's
    text, where it exists) with objectives that need no labels, and write them into a native
    checkpoint at `out_dir`."""
    _check_llm(cfg)
    pixels = dataset_images(data_dir, f"{builders.CAPTIONS}/{name}", cfg.vision.image_size,
                            vision_pool)
    log(f"pre-training the image encoder (masked patches of {len(pixels)} training images)")
    vision, r2 = pretrain_vision_unlabelled(cfg.vision, pixels, steps=vision_steps,
                                            batch_size=batch_size, seed=seed, log=log)
    corpus = dataset_corpus(data_dir, name, seed)
    log(f"pre-training the language model (causal LM on {len(corpus)} documents of the training "
        "split's captions, questions and answers)")
    llm, llm_acc = pretrain_llm(cfg.llm, tokenizer, steps=llm_steps, batch_size=batch_size,
                                corpus=corpus, seed=seed, log=log)
    _save(cfg, vision, llm, out_dir, seed)
    return {"vision_images": len(pixels), "vision_masked_r2": r2, "llm_documents": len(corpus),
            "llm_token_accuracy": llm_acc}


def _check_llm(cfg: Blip2Config) -> None:
    if not isinstance(cfg.llm, OPTConfig):
        raise ValueError("the demo pre-trains an OPT-style language model")


def _save(cfg: Blip2Config, vision, llm, out_dir: str, seed: int) -> None:
    params = jax.tree.map(np.asarray, blip2_model.init_params(cfg, seed))
    params["vision"] = jax.tree.map(np.asarray, vision)
    params["llm"] = jax.tree.map(np.asarray, llm)
    api.Blip2(cfg, params).save(out_dir, format="native")


__all__ = ["make_unimodal", "make_unimodal_from_dataset", "pretrain_vision",
           "pretrain_vision_unlabelled", "dataset_images", "dataset_corpus", "patch_targets",
           "pretrain_llm", "scene_images", "cell_labels",
           "text_corpus", "document_ids", "answer_rows", "score_answers", "answer_accuracy"]
