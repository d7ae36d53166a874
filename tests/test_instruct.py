"""InstructBLIP instruction tuning (configs/tiny_instruct.py, configs/instruct.py): captions and
VQA mixed in one run, one template per example drawn from (seed, position) only, √-size mixture
weights, each row's targets exactly its response and END, bad templates and lengths refused by
name, and train.py + eval.py end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import runs
from blip2_jax import processing, run_config
from blip2_jax.data import builders, pipeline
from blip2_jax.train import loop

TEMPLATES = {"caption": ("a picture of", "an image with", "there is"),
             "vqa": ("{}", "a picture of {}", "{} is")}
MIX = [pipeline.Source("blip2_captions/synthetic", "train"),
       pipeline.Source("blip2_vqa/synthetic", "train")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 training images (8 caption records, 24 questions), 4 test images."""
    return runs.synthetic_data(str(tmp_path_factory.mktemp("synthetic_instruct")), train=8,
                               test=4)


def _pipe(data_dir, seed=0, templates=TEMPLATES, sources=MIX, **kw):
    kw = {"num_threads": 1, **kw}
    return pipeline.Pipeline(sources, data_dir=data_dir, batch_size=16, seed=seed,
                             image_size=32, flip=False, image_processor="blip_image_eval",
                             templates=templates, **kw)


def _rows(batches):
    keys = ("dataset_index", "index", "template", "text", "answer")
    return [tuple(str(b[k][i]) for k in keys) for b in batches for i in range(len(b["text"]))]


# ------------------------------------------------------------------------------------------------
# The template draw and the mixture
# ------------------------------------------------------------------------------------------------
def test_the_template_is_a_function_of_seed_and_position(data_dir):
    it = iter(_pipe(data_dir))
    whole = [next(it) for _ in range(6)]
    rows = _rows(whole)
    # Both kinds in one run, each with its own pool; the instruction is the filled template.
    kinds = {0: builders.CAPTIONS, 1: builders.VQA}
    used = {builders.CAPTIONS: set(), builders.VQA: set()}
    for b in whole:
        for d, t, text in zip(b["dataset_index"], b["template"], b["text"]):
            task = "caption" if kinds[int(d)] == builders.CAPTIONS else "vqa"
            pool = TEMPLATES[task]
            used[kinds[int(d)]].add(int(t))
            if task == "caption":
                assert text == pool[t]
            else:
                prefix, suffix = pool[t].split("{}")
                assert text.startswith(prefix) and text.endswith(suffix) and "?" in text
    assert used == {k: {0, 1, 2} for k in used}            # every template is drawn
    # Two processes reading their halves of each global batch, and 2 read threads: the same rows.
    halves = [iter(_pipe(data_dir, process_index=p, process_count=2)) for p in (0, 1)]
    two = [{k: np.concatenate([a[k], b[k]]) for k in ("dataset_index", "index", "template",
                                                       "text", "answer")}
           for a, b in ((next(halves[0]), next(halves[1])) for _ in range(3))]
    assert _rows(two) == rows[:48]
    threads = iter(_pipe(data_dir, num_threads=2))
    assert _rows([next(threads) for _ in range(2)]) == rows[:32]
    # Resumable: a restored iterator continues with the same rows.
    it = iter(_pipe(data_dir))
    next(it), next(it)
    state = it.get_state()
    again = iter(_pipe(data_dir))
    again.set_state(state)
    assert _rows([next(again)]) == rows[32:48]
    # Another seed, other draws; within a run the same record gets different templates at
    # different positions.
    other = iter(_pipe(data_dir, seed=1))
    assert [r[2] for r in _rows([next(other) for _ in range(6)])] != [r[2] for r in rows]
    by_record: dict = {}
    for d, i, t, *_ in rows:
        by_record.setdefault((d, i), set()).add(t)
    assert any(len(ts) > 1 for ts in by_record.values())


def test_mixture_weights_are_sqrt_size_or_given(data_dir):
    p = _pipe(data_dir)
    assert p._weights == pytest.approx([np.sqrt(8), np.sqrt(24)])
    assert pipeline.balanced_weights([9, 100]) == [3.0, 10.0]
    it = iter(p)
    d = np.concatenate([next(it)["dataset_index"] for _ in range(25)])
    assert abs(np.mean(d == 0) - np.sqrt(8) / (np.sqrt(8) + np.sqrt(24))) < 0.08
    given = _pipe(data_dir, sources=[pipeline.Source("blip2_captions/synthetic", "train", 3.0),
                                     pipeline.Source("blip2_vqa/synthetic", "train")])
    assert given._weights == pytest.approx([3.0, np.sqrt(24)])


# ------------------------------------------------------------------------------------------------
# The rows the loss reads
# ------------------------------------------------------------------------------------------------
def _tokenizer(data_dir, kind):
    return processing.load_tokenizer(f"{data_dir}/tokenizers/synthetic/{kind}", kind)


@pytest.mark.parametrize("llm", ["llama", "opt", "t5"])
def test_the_targets_are_exactly_the_response_and_end(data_dir, llm):
    c = runs.config("tiny_instruct", f"{'llama' if llm == 'opt' else llm},{data_dir}",
                    total_steps=4)
    if llm == "opt":          # the same recipe with BLIP-2's OPT (END "\n")
        c.model = "tiny-opt"
        c.model_overrides = dict(llm=dict(vocab_size=384), qformer=dict(has_text_input=True),
                                 qformer_text_input=True)
        c.text.llm_tokenizer = "{data_dir}/tokenizers/synthetic/opt"
    cfg = run_config.model_config(c)
    text = run_config.text_setup(c, cfg)
    data = run_config.data_config(c, cfg, text)
    b = next(iter(pipeline.from_config(data, batch_size=16, seed=0, process_index=0,
                                       process_count=1)))
    assert set(b["dataset_index"].tolist()) == {0, 1}           # captions and questions
    # The Q-Former reads the instruction, BERT-tokenized.
    qtok = _tokenizer(data_dir, "qformer")
    ref, _ = processing.tokenize_prompts(qtok, list(b["text"]), kind="qformer", max_length=48,
                                         padding="max_length")
    np.testing.assert_array_equal(b["qformer_ids"], ref)
    tok = _tokenizer(data_dir, llm)
    if llm == "t5":
        # Encoder: the instruction; decoder: the response (caption or answer) and </s>.
        assert processing.decode(tok, b["llm_ids"], eos_token_id=1) == list(b["text"])
        assert processing.decode(tok, b["target_ids"], eos_token_id=1) == list(b["answer"])
        return
    # [BOS] instruction response END: the targets are the response's tokens and END (LLaMA
    # EOS, OPT "\n"), after an instruction of the row's own length.
    end = tok("\n", add_special_tokens=False)["input_ids"] if llm == "opt" else [tok.eos_token_id]
    targets = np.zeros_like(b["llm_ids"])
    for i, (prompt, answer) in enumerate(zip(b["text"], b["answer"])):
        p = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
        a = tok((" " if llm == "opt" else "") + answer, add_special_tokens=False)["input_ids"]
        a += end
        assert b["llm_ids"][i, p:p + len(a)].tolist() == a
        targets[i, p:p + len(a)] = 1
    np.testing.assert_array_equal(b["llm_targets"], targets)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_templates_and_lengths_are_refused_by_name(data_dir):
    with pytest.raises(ValueError, match=r"must hold exactly one \{\} where the question goes"):
        _pipe(data_dir, templates={**TEMPLATES, "vqa": ("{}", "Short answer:")})
    with pytest.raises(ValueError, match="no question to fill in"):
        _pipe(data_dir, templates={**TEMPLATES, "caption": ("a picture of {}",)})
    with pytest.raises(ValueError, match="no template pool for the \\['blip2_vqa'\\]"):
        _pipe(data_dir, templates={"caption": TEMPLATES["caption"]})
    with pytest.raises(ValueError, match="one dataset kind, unless it is instruction tuning"):
        _pipe(data_dir, templates=None)
    c = runs.config("tiny_instruct", f"llama,{data_dir}", total_steps=4)
    cfg = run_config.model_config(c)
    c.text.max_length = cfg.qformer.max_position_embeddings + 1
    with pytest.raises(run_config.RunConfigError,
                       match="exceeds the Q-Former's 64 text positions"):
        run_config.text_setup(c, cfg)


# ------------------------------------------------------------------------------------------------
# train.py + eval.py
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_train_then_eval(data_dir, llm, tmp_path, capsys):
    work = str(tmp_path / "run")
    # The whole training mixture's size in every batch: the loss falls step by step. Evaluation
    # greedy and short, without METEOR (a JVM: ~10 s), one batch per evaluator.
    evaluators = {"eval.evaluators.caption_test.meteor": False,
                  "eval.evaluators.caption_test.num_beams": 1,
                  "eval.evaluators.caption_test.max_new_tokens": 4,
                  "eval.evaluators.vqa_test.num_beams": 1,
                  "eval.evaluators.vqa_test.max_new_tokens": 2, "eval.batch_size": 16}
    loop.run(runs.config("tiny_instruct", f"{llm},{data_dir}", total_steps=4, batch_size=32,
                         checkpoint_every_steps=100, **evaluators), work)
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["lm"]) for r in rows) and rows[-1]["lm"] < rows[0]["lm"]
    eval_cli = runs.script("eval")
    out = os.path.join(work, "eval_out")
    code = eval_cli.main(["eval.py", "--workdir", work, "--output", out, "--no-report"])
    assert code == 0, capsys.readouterr()
    with open(os.path.join(out, "results.json")) as f:
        metrics = json.load(f)["metrics"]
    assert metrics["vqa_test"]["questions"] == 12 and 0.0 <= metrics["vqa_test"]["overall"] <= 100
    assert metrics["caption_test"]["images"] == 4
