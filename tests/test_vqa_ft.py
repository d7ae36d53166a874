"""VQA fine-tuning (configs/tiny_vqa.py, configs/vqa_ft.py): the answer-generation loss covers
the answer tokens only, each row after a prompt of its own length; the multi-answer rule against
LAVIS's; the same step on 1 and 8 devices; bad input (no answers, a question longer than the
Q-Former's text length); train.py + eval.py end to end with the official VQA accuracy, and a
preempted run resumed equal to an uninterrupted one."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import signal

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

import blip2_jax
import runs
from blip2_jax import api, processing, run_config
from blip2_jax.convert.mapping import flatten, unflatten
from blip2_jax.data import batch as batch_lib, builders, pipeline
from blip2_jax.losses import LossConfig
from blip2_jax.models import blip2 as blip2_model
from blip2_jax.train import loop
from blip2_jax.train.step import loss_fn
from blip2_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 training images with 3 questions each: a training batch of 24 is the whole split."""
    return runs.synthetic_data(str(tmp_path_factory.mktemp("synthetic_vqa")), train=8, test=4)


def _config(data_dir, llm, **overrides):
    # The whole training split in every batch: the loss falls step by step even with the tiny
    # random frozen LLM, whose near-uniform outputs leave the answers' loss close to log(V).
    return runs.config("tiny_vqa", f"{llm},{data_dir}",
                       **{"total_steps": 4, "batch_size": 24, **overrides})


def _no_dropout(cfg):
    return cfg.replace(qformer=dataclasses.replace(cfg.qformer, hidden_dropout=0.0,
                                                   attention_dropout=0.0))


def _setup(data_dir, llm):
    """(run config, model config without dropout, TextSetup, a numeric training batch of 8)."""
    c = _config(data_dir, llm)
    cfg = _no_dropout(run_config.model_config(c))
    text = run_config.text_setup(c, cfg)
    data = run_config.data_config(c, cfg, text)
    host = next(iter(pipeline.from_config(data, batch_size=8, seed=3, process_index=0,
                                          process_count=1)))
    return c, cfg, text, host


def _tokenizer(data_dir, kind):
    return processing.load_tokenizer(f"{data_dir}/tokenizers/synthetic/{kind}", kind)


def _random_params(cfg, seed=0, std=0.1):
    """Every leaf drawn at a visible scale (norm scales around 1), without compiling the model's
    init. (At the init's 0.02 the tiny LLM's outputs are near uniform: every token's
    log-probability within ~1e-3 of -log(V), so losses over other positions would hardly
    differ.)"""
    rng = np.random.default_rng(seed)
    flat = flatten(blip2_model.abstract_params(cfg))
    return unflatten({k: (float(k.endswith("/scale")) + std * rng.standard_normal(
        v.shape)).astype(v.dtype) for k, v in flat.items()})


def _ce(logits, labels, where):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None].astype(np.int64), -1)[..., 0]
    return float((nll * where).sum() / where.sum())


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
def test_the_loss_covers_exactly_the_answer_tokens(data_dir, llm):
    c, cfg, text, host = _setup(data_dir, llm)
    batch = batch_lib.select(host, run_config.batch_fields(c, cfg, text))
    params = _random_params(cfg)
    loss, _ = jax.jit(loss_fn(cfg, LossConfig()))(params, {}, batch, jax.random.PRNGKey(0))
    model = api.Blip2(cfg, params, check=False)
    q = dict(qformer_input_ids=batch["qformer_ids"], qformer_attention_mask=batch["qformer_mask"])
    # The Q-Former reads the filled prompt (here the bare question), BERT-tokenized.
    qtok = _tokenizer(data_dir, "qformer")
    for row, prompt in zip(batch["qformer_ids"], host["text"]):
        ref, _ = processing.tokenize_prompts(qtok, prompt, kind="qformer", max_length=32,
                                             padding="max_length")
        np.testing.assert_array_equal(row, ref[0])
    tok = _tokenizer(data_dir, llm)
    if llm == "t5":
        # Encoder: the prompt; decoder: the answer and </s>, nothing of the prompt.
        assert processing.decode(tok, batch["target_ids"], eos_token_id=1) == list(host["answer"])
        assert processing.decode(tok, batch["llm_ids"], eos_token_id=1) == list(host["text"])
        dec = np.concatenate([np.zeros((8, 1), np.int32), batch["target_ids"][:, :-1]], 1)
        logits = model.logits(batch["image"], batch["llm_ids"], batch["llm_mask"], dec,
                              batch["target_mask"], **q)
        ref = _ce(logits, batch["target_ids"], batch["target_mask"])
        assert abs(float(loss) - ref) < 1e-5 * ref
        return
    # Decoder-only: [BOS prompt answer END]; the targets, found here from each row's own prompt
    # length, are the answer's tokens and END ("\n" for OPT, </s> for LLaMA).
    end = tok("\n", add_special_tokens=False)["input_ids"] if llm == "opt" else [tok.eos_token_id]
    targets = np.zeros_like(batch["llm_ids"])
    lengths = set()
    for i, (prompt, answer) in enumerate(zip(host["text"], host["answer"])):
        p = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
        a = tok((" " if llm == "opt" else "") + answer, add_special_tokens=False)["input_ids"]
        assert batch["llm_ids"][i, p:p + len(a) + len(end)].tolist() == a + end
        targets[i, p:p + len(a) + len(end)] = 1
        lengths.add(p)
    assert len(lengths) > 1                            # prompts of different lengths in one batch
    np.testing.assert_array_equal(batch["llm_targets"], targets)
    logits = np.asarray(model.logits(batch["image"], batch["llm_ids"], batch["llm_mask"], **q))
    ids = batch["llm_ids"]
    ref = _ce(logits[:, :-1], ids[:, 1:], targets[:, 1:])
    assert abs(float(loss) - ref) < 1e-5 * ref
    # A loss over the prompt's tokens too (LAVIS's caption targets) is another number.
    with_prompt = _ce(logits[:, :-1], ids[:, 1:], batch["llm_mask"][:, 1:])
    assert abs(float(loss) - with_prompt) > 1e-2


def _lavis_answer_weights(answers):
    """LAVIS `COCOVQADataset.__getitem__` (coco_vqa_datasets.py), as written there."""
    answer_weight = {}
    for answer in answers:
        if answer in answer_weight.keys():
            answer_weight[answer] += 1 / len(answers)
        else:
            answer_weight[answer] = 1 / len(answers)
    return list(answer_weight.keys()), list(answer_weight.values())


def _lavis_blip_vqa_loss(per_answer_loss, weights, bsz):
    """LAVIS `BlipVQA.forward_decoder`: `loss = weights * loss; loss.sum() / bsz`, one row per
    (question, unique answer)."""
    return float((np.asarray(weights) * np.asarray(per_answer_loss)).sum() / bsz)


def _png(seed):
    rgb = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


ANSWERS = ["two"] * 6 + ["three"] * 3 + ["four"]          # VQAv2-style: 10 annotator answers


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """A VQA dataset of one multi-answer question (train) and a record without answers."""
    d = str(tmp_path_factory.mktemp("vqa_answers"))
    common = {"image": _png(0), "image_id": "img0", "image_index": 0}
    train = [{**common, "question_id": "q0", "question": "how many shapes are there?",
              "answers": ANSWERS, "index": 0}]
    bad = [{**common, "question_id": "q0", "question": "how many shapes are there?",
            "answers": ANSWERS, "index": 0},
           {**common, "question_id": "q1", "question": "what color is the star?",
            "answers": [], "index": 1}]
    builders.build(builders.VQA, "answers", d, {"train": lambda: train, "bad": lambda: bad})
    return d


def test_one_answer_drawn_by_frequency_is_lavis_weighted_loss_in_expectation(data_dir,
                                                                             vqa_dir):
    """LAVIS weights each unique answer by count / total. BLIP's VQA loss sums the weighted
    per-answer losses; InstructBLIP draws one answer by those weights. Ours is the draw, from
    (seed, position): its frequencies are LAVIS's weights, so the expected loss of a question is
    BLIP's weighted sum (computed here with the tiny model's per-answer losses)."""
    values, weights = _lavis_answer_weights(ANSWERS)
    pipe = pipeline.Pipeline([pipeline.Source("blip2_vqa/answers", "train")], data_dir=vqa_dir,
                             batch_size=50, seed=0, image_size=30, flip=False,
                             image_processor="blip_image_eval", num_threads=1)
    it = iter(pipe)
    drawn = np.concatenate([next(it)["answer"] for _ in range(40)])         # 2000 draws
    freq = np.array([np.mean(drawn == v) for v in values])
    np.testing.assert_allclose(freq, weights, atol=0.04)     # > 4 sigma for 2000 draws
    # InstructBLIP's draw, as LAVIS writes it, has the same distribution.
    rng = random.Random(0)
    lavis = [values[rng.choices(list(range(len(values))), weights=weights, k=1)[0]]
             for _ in range(2000)]
    np.testing.assert_allclose([lavis.count(v) / 2000 for v in values], weights, atol=0.04)
    # Per-answer losses of the tiny model: one row per (question, answer), as BLIP builds them.
    c = _config(data_dir, "opt")
    cfg = _no_dropout(run_config.model_config(c))
    tok, qtok = _tokenizer(data_dir, "opt"), _tokenizer(data_dir, "qformer")
    question = "how many shapes are there?"
    rows = [processing.tokenize_prompt_answer(tok, question, v, kind="opt", max_length=16,
                                              suffix="\n") for v in values]
    q_ids, q_mask = processing.tokenize_prompts(qtok, [question] * len(values), kind="qformer",
                                                max_length=16, padding="max_length")
    image = np.repeat(np.asarray(next(iter(pipe))["image"][:1]), len(values), 0)
    params = _random_params(cfg)
    fn = jax.jit(loss_fn(cfg, LossConfig()))
    per_answer = []
    for i in range(len(values)):
        one = {"image": image[i:i + 1], "llm_ids": rows[i][0][None], "llm_mask": rows[i][1][None],
               "llm_targets": rows[i][2][None], "qformer_ids": q_ids[i:i + 1],
               "qformer_mask": q_mask[i:i + 1]}
        per_answer.append(float(fn(params, {}, one, jax.random.PRNGKey(0))[0]))
    assert len(set(per_answer)) == len(values)
    expected_ours = float(np.dot(freq, per_answer))          # the mean loss over the draws
    lavis_loss = _lavis_blip_vqa_loss(per_answer, weights, bsz=1)
    assert abs(expected_ours - lavis_loss) < 0.04 * max(per_answer)
    # The draw depends on (seed, position) only: 2 processes read the same answers.
    halves = [iter(pipeline.Pipeline(
        [pipeline.Source("blip2_vqa/answers", "train")], data_dir=vqa_dir, batch_size=50, seed=0,
        image_size=30, flip=False, image_processor="blip_image_eval", num_threads=1,
        process_index=p, process_count=2)) for p in (0, 1)]
    for step in range(3):
        both = np.concatenate([next(h)["answer"] for h in halves])
        np.testing.assert_array_equal(both, drawn[step * 50:(step + 1) * 50])


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_a_question_without_answers_is_skipped_and_counted(vqa_dir):
    common = dict(data_dir=vqa_dir, batch_size=2, seed=0, image_size=30, flip=False,
                  image_processor="blip_image_eval", num_threads=1)
    it = iter(pipeline.Pipeline([pipeline.Source("blip2_vqa/answers", "bad")], **common))
    batch = next(it)
    assert list(batch["question_id"]) == ["q0", "q0"]            # only the good one is trained
    count, first = pipeline.skipped(it)
    assert count >= 1 and "question q1 (index 1): no answers" in first[0]
    ev = next(iter(pipeline.Pipeline([pipeline.Source("blip2_vqa/answers", "bad")],
                                     train=False, **common)))
    # Evaluation keeps it as an invalid row.
    assert dict(zip(ev["question_id"], ev["valid"])) == {"q0": True, "q1": False}


def test_a_question_longer_than_the_text_length_is_cut(data_dir):
    """Questions are cut to config.text.max_length (the Q-Former's [SEP] kept, LAVIS's
    truncation); a length beyond the Q-Former's position table is refused by name. Decoder-only
    rows keep the whole answer and the prompt's end."""
    c = _config(data_dir, "opt")
    cfg = run_config.model_config(c)
    spec = next(s for s in run_config.text_setup(c, cfg).specs if s.name == "qformer")
    qtok = _tokenizer(data_dir, "qformer")
    long = "is there a red circle " * 20 + "?"
    ids, mask = processing.tokenize_prompts(qtok, long, kind="qformer",
                                            max_length=spec.max_length, padding="max_length")
    assert ids.shape == (1, 32) and mask.all() and ids[0, -1] == qtok.sep_token_id
    c.text.max_length = cfg.qformer.max_position_embeddings + 1
    with pytest.raises(run_config.RunConfigError, match="exceeds the Q-Former's 64 text "
                                                        "positions"):
        run_config.text_setup(c, cfg)
    tok = _tokenizer(data_dir, "opt")
    ids, mask, targets = processing.tokenize_prompt_answer(tok, long, "two", kind="opt",
                                                           max_length=16, suffix="\n")
    assert mask.all() and ids[0] == tok.bos_token_id
    assert processing.decode(tok, ids[None, 1:][:, targets[1:] > 0]) == ["two"]
    assert processing.decode(tok, ids[None, 1:][:, targets[1:] == 0]).pop().endswith("circle ?")


# ------------------------------------------------------------------------------------------------
# The step on any mesh
# ------------------------------------------------------------------------------------------------
def _mesh(n, axes):
    return Mesh(np.array(jax.devices()[:n]).reshape(axes), ("data", "fsdp", "tensor"))


def test_the_same_step_on_one_and_eight_devices(data_dir):
    c, cfg, text, host = _setup(data_dir, "opt")
    batch = batch_lib.select(host, run_config.batch_fields(c, cfg, text))
    params = _random_params(cfg)
    opt = dict(lr=1e-3, warmup_steps=1, warmup_lr=1e-4, min_lr=1e-5)
    out = {}
    for n, axes in ((1, (1, 1, 1)), (8, (2, 2, 2))):
        tr = Trainer(cfg, LossConfig(), opt, total_steps=10, mesh=_mesh(n, axes),
                     frozen=("vision/.*", "llm/.*"), frozen_dtype=None)
        st, fr = tr.init(params, seed=0)
        metrics = []
        for _ in range(2):
            st, m = tr.step(st, fr, tr.place(batch))
            metrics.append(jax.tree.map(float, m))
        out[n] = metrics, flatten(jax.tree.map(np.asarray, st.params))
    (m1, p1), (m8, p8) = out[1], out[8]
    for a, b in zip(m1, m8):
        for k in ("loss", "lm", "grad_norm", "param_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for path, ref in p1.items():
        if not path.endswith("key/bias"):      # zero true gradient: Adam-amplified noise
            assert np.abs(p8[path] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), path


# ------------------------------------------------------------------------------------------------
# train.py + eval.py
# ------------------------------------------------------------------------------------------------
def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """tiny_vqa:opt and :t5 trained 4 steps each (loop.run, what train.py runs)."""
    out = {}
    for llm in ("opt", "t5"):
        work = str(tmp_path_factory.mktemp(f"vqa_{llm}") / "run")
        loop.run(_config(data_dir, llm, checkpoint_every_steps=100), work)
        out[llm] = work
    return out


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_train_then_eval_gives_vqa_accuracy(data_dir, trained, llm, capsys):
    work = trained[llm]
    rows = _rows(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["lm"]) for r in rows) and rows[-1]["lm"] < rows[0]["lm"]
    model = blip2_jax.load(os.path.join(work, "final"), dtype=None)
    assert model.config.qformer_text_input and model.config.llm_kind == llm
    assert {str(x.dtype) for x in jax.tree.leaves(model.params["llm"])} == {"bfloat16"}
    eval_cli = runs.script("eval")
    out = os.path.join(work, "eval_out")
    code = eval_cli.main(["eval.py", "--config",
                          f"{os.path.join(ROOT, 'configs', 'tiny_vqa.py')}:{llm},{data_dir}",
                          "--workdir", work, "--output", out, "--no-report",
                          "--config.eval.evaluators.vqa_test.num_beams=1",
                          "--config.eval.batch_size=8"])
    assert code == 0, capsys.readouterr()
    with open(os.path.join(out, "results.json")) as f:
        metrics = json.load(f)["metrics"]["vqa_test"]
    assert metrics["questions"] == 12 and 0.0 <= metrics["overall"] <= 100.0


def test_a_sigterm_run_resumes_to_the_same_run(data_dir, trained, tmp_path, monkeypatch):
    """SIGTERM at the second logged step (a preemption): the loop finishes the steps in flight,
    saves a checkpoint and returns before the last step, without final/; the same command then continues to step 4 with the
    same losses and parameters as the uninterrupted run."""
    work = str(tmp_path / "parts")
    logged = []
    throughput = loop._throughput

    def preempt_at_step_2(*a, **k):          # called at each logged step (log_every_steps=1)
        logged.append(True)
        if len(logged) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return throughput(*a, **k)
    monkeypatch.setattr(loop, "_throughput", preempt_at_step_2)
    first = loop.run(_config(data_dir, "opt", log_every_steps=1, checkpoint_every_steps=100),
                     work)
    assert first["preempted"] and 2 <= first["step"] < 4
    assert not os.path.exists(os.path.join(work, "final"))
    monkeypatch.setattr(loop, "_throughput", throughput)
    assert loop.run(_config(data_dir, "opt", checkpoint_every_steps=100), work)["step"] == 4
    whole = {r["step"]: r for r in _rows(trained["opt"])}
    for r in _rows(work):
        for k in ("loss", "lm", "grad_norm", "param_norm", "lr"):
            assert r[k] == whole[r["step"]][k], (r["step"], k)
    a, b = (flatten(jax.tree.map(np.asarray, blip2_jax.load(os.path.join(w, "final"),
                                                            dtype=None).params))
            for w in (trained["opt"], work))
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
