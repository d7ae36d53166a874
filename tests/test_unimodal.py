"""The demo's unimodal pre-training (blip2_jax/train/unimodal.py): data layouts and heads."""
import jax
import numpy as np

from blip2_jax import processing
from blip2_jax.config import VisionConfig
from blip2_jax.data import synthetic
from blip2_jax.train import unimodal


def test_document_ids_put_bos_before_each_caption(tmp_path):
    docs = unimodal.caption_corpus(20, seed=0, per_document=2)
    assert all(len(d) == 2 and synthetic.parse_caption(d[0]) == synthetic.parse_caption(d[1])
               for d in docs)                               # paraphrases of one scene
    tok_dir = synthetic.write_tokenizers([c for d in docs for c in d], str(tmp_path))["opt"]
    tok = processing.load_tokenizer(tok_dir, "opt")
    ids, mask = unimodal.document_ids(tok, docs, max_length=96)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for row, doc in enumerate(docs):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()
        expected = []
        for cap in doc:
            expected += [tok.bos_token_id] + tok(cap, add_special_tokens=False)["input_ids"]
            expected += newline
        assert ids[row, :n].tolist() == expected[:96]
    short_ids, _ = unimodal.document_ids(tok, docs, max_length=10)
    assert short_ids.shape == (20, 10) and (short_ids[:, 0] == tok.bos_token_id).all()


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
