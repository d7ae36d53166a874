"""The demo's unimodal pre-training (blip2_jax/train/unimodal.py): data layouts and heads."""
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import processing
from blip2_jax.config import VisionConfig
from blip2_jax.data import synthetic
from blip2_jax.train import unimodal


def test_text_corpus_documents_and_their_ids(tmp_path):
    """Each document is about one scene: a caption first, then a paraphrase and question-answer
    lines in the VQA prompt, in some order; each line becomes `[BOS] line "\\n"`."""
    docs = unimodal.text_corpus(20, seed=0, questions=3)
    for d in docs:
        scene = synthetic.parse_caption(d[0])
        assert scene is not None and len(d) == 5
        captions = [line for line in d if not line.startswith("Question: ")]
        assert len(captions) == 2 and {synthetic.parse_caption(c) for c in captions} == {scene}
        for line in d[1:]:
            if line.startswith("Question: "):
                q, a = line[len("Question: "):].split(" Answer: ")
                assert synthetic.question_kind(q) and a
    assert len({tuple(d[1:]) for d in docs}) == 20
    tok_dir = synthetic.write_tokenizers([line for d in docs for line in d], str(tmp_path))["opt"]
    tok = processing.load_tokenizer(tok_dir, "opt")
    ids, mask = unimodal.document_ids(tok, docs, max_length=128)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for row, doc in enumerate(docs):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()
        expected = []
        for line in doc:
            expected += [tok.bos_token_id] + tok(line, add_special_tokens=False)["input_ids"]
            expected += newline
        assert ids[row, :n].tolist() == expected[:128]
    short_ids, _ = unimodal.document_ids(tok, docs, max_length=10)
    assert short_ids.shape == (20, 10) and (short_ids[:, 0] == tok.bos_token_id).all()


def test_answer_accuracy_scores_exactly_the_answer_tokens(tmp_path):
    """An LM that always predicts the next token of the reference row scores 1; one wrong
    token anywhere in an answer (or its "\\n") makes that answer wrong; tokens outside the
    answers do not count."""
    docs = unimodal.text_corpus(30, seed=0)
    tok_dir = synthetic.write_tokenizers([line for d in docs for line in d], str(tmp_path))["opt"]
    tok = processing.load_tokenizer(tok_dir, "opt")
    rows, spans = unimodal.answer_rows(tok, n_scenes=5, seed=1, described=True)
    assert len(rows) == len(spans) and all(s < e for s, e in spans)
    for (s, e), row in zip(spans, rows):
        assert tok.decode(row[s:e]).strip() in synthetic.SHAPES + synthetic.SIZES + tuple(
            synthetic.COLORS) + ("yes", "no", "1", "2", "3") + tuple(
            p for r in synthetic.POSITIONS for p in r)
        assert tok.decode(row[e - 1:e]) == "\n"
    perfect = np.roll(rows, -1, axis=1)                  # the prediction at t is token t + 1
    assert unimodal.score_answers(perfect, rows, spans) == 1.0
    wrong = perfect.copy()
    s, e = spans[0]
    wrong[0, e - 2] += 1                                 # the answer's "\\n"
    wrong[1, :spans[1][0] - 1] += 1                      # everything before the answer
    assert unimodal.score_answers(wrong, rows, spans) == 1.0 - 1 / len(rows)


def test_scene_parser_heads_and_labels():
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          image_size=36, patch_size=6)
    pixels, labels = unimodal.scene_images(3, 36, seed=0, render_size=72)
    model = unimodal.SceneParser(vision)
    params = model.init(jax.random.PRNGKey(0), pixels)["params"]
    cells, where = model.apply({"params": params}, pixels)
    assert cells.shape == (3, 9, unimodal.NUM_CELL_CLASSES) and where.shape == (3, 36, 36)
    # Labels: 0 for an empty cell, else 1 + the object's class; 1-3 objects per scene.
    assert ((labels > 0).sum(1) >= 1).all() and ((labels > 0).sum(1) <= 3).all()
    assert labels.max() < unimodal.NUM_CELL_CLASSES


def test_patch_targets_are_each_patchs_pooled_pixels():
    """The masked-patch objective's targets: patch k (row-major, as the ViT orders its tokens)
    holds its pixels 2x2-pooled, row-major within the patch."""
    x = np.random.default_rng(0).normal(size=(2, 24, 24, 3)).astype(np.float32)
    t = np.asarray(unimodal.patch_targets(jnp.asarray(x), 12)).reshape(2, 4, 6, 6, 3)
    np.testing.assert_allclose(t[:, 1, 0, 0], x[:, 0:2, 12:14].mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(t[:, 2, 5, 3], x[:, 22:24, 6:8].mean(axis=(1, 2)), atol=1e-6)
