"""The main job end to end (`python -m blip2_jax.demo --quick`: every step of the real recipe on
a small dataset with a few dozen steps per stage), and loss-curve sanity: its losses fall."""
import json
import os
import sys

import numpy as np
import pytest

from blip2_jax import demo, processing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import second_dataset  # noqa: E402  (bench/: the second generator)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_demo_runs_end_to_end_and_its_losses_fall(tmp_path, capsys):
    work = str(tmp_path / "demo")
    results = demo.main(["--work", work, "--quick", "--captions", "8", "--ablation"])
    for stage, terms in (("stage1", ("itc", "itg")), ("stage2", ("lm",)),
                         ("stage2_fresh", ("lm",))):
        rows = _rows(os.path.join(work, stage, "metrics.jsonl"))
        assert rows[-1]["step"] == 40
        for k in terms:              # the mean of the last 3 logs is below the first log
            assert np.mean([r[k] for r in rows[-3:]]) < rows[0][k], (stage, k)
        assert os.path.isdir(os.path.join(work, stage, "final"))
    # Both stages trained from one frozen-feature cache of the ViT (stage 1 computed it).
    with open(os.path.join(work, "features/blip2_captions/synthetic/train/meta.json")) as f:
        assert json.load(f)["images"] == 256
    for stage in ("stage1", "stage2"):
        with open(os.path.join(work, stage, "config.json")) as f:
            assert json.load(f)["config"]["data"]["features"] == os.path.join(work, "features")
    assert results["test_images"] == 10 and results["retrieval_chance"] == 1 / 10
    # The figures, as fractions, and the captions as counts.
    for k in ("retrieval_r1_i2t", "retrieval_r1_t2i", "itm_rerank_r1_i2t", "vqa_zero_shot",
              "vqa_answer_prior", "vqa_chance"):
        assert 0 <= results[k] <= 1, k
    # Chance: a uniform guess among each kind's test answers, weighted by the kind's questions.
    kinds = results["vqa_by_kind"]
    assert set(kinds) <= {"count", "color", "shape", "size", "where", "exists"}
    assert sum(v["questions"] for v in kinds.values()) == 30        # 10 scenes x 3
    assert abs(results["vqa_chance"] - sum(v["chance"] * v["questions"] for v in kinds.values())
               / 30) < 1e-9
    assert abs(results["vqa_zero_shot"] - sum(v["accuracy"] * v["questions"]
                                              for v in kinds.values()) / 30) < 1e-6
    # The ablation's two arms: stage 2 from the stage-1 Q-Former, and from a fresh one.
    arms = results["ablation"]
    assert set(arms) == {"stage1_qformer", "fresh_qformer"}
    assert arms["stage1_qformer"]["vqa_zero_shot"] == results["vqa_zero_shot"]
    for arm in arms.values():
        assert 0 <= arm["vqa_zero_shot"] <= 1 and 0 <= arm["captions_right"] <= 8
        assert np.isfinite(arm["caption_cider"])
    assert results["captions_total"] == 8 and 0 <= results["captions_right"] <= 8
    n_right = results["captions_right"]       # examples: up to 4 right, 2 wrong
    assert [e["right"] for e in results["examples"]] == ([True] * min(4, n_right)
                                                         + [False] * min(2, 8 - n_right))
    with open(os.path.join(work, "results.json")) as f:
        assert json.load(f)["retrieval_r1_t2i"] == results["retrieval_r1_t2i"]
    out = capsys.readouterr().out
    assert "held-out retrieval R@1 by ITC" in out
    assert f"captions fully right: {n_right} of 8 held-out images" in out
    assert "{'" not in out                    # every figure labelled, no dict printed as is
    # The silent phases say what they do; stage 2 names the stage-1 model it starts from.
    for words in ("building the frozen-feature cache", "compiling the training step",
                  f"<- stage-1 model {work}/stage1/final"):
        assert words in out, words
    # The configs' evaluators ran and wrote a report per stage.
    assert {"retrieval_test", "caption_test", "vqa_test"} <= set(results["evaluators"])
    assert results["evaluators"]["retrieval_test"]["images"] == 10
    for report in results["reports"]:
        assert os.path.isfile(report) and report in out
    # A re-run finds every stage done and only evaluates again, to the same figures.
    again = demo.main(["--work", work, "--quick", "--captions", "8"])
    assert again["retrieval_r1_i2t"] == results["retrieval_r1_i2t"]
    assert "1/5" not in capsys.readouterr().out


def test_demo_runs_on_your_own_data(tmp_path, capsys):
    """`--annotations` (LAVIS JSON of a dataset made by another renderer, with other concepts):
    the dataset and tokenizers fitted to its training text are built, the towers pre-trained
    without labels, both stages trained (their losses fall) and every figure produced."""
    src = str(tmp_path / "second")
    second_dataset.write(src, {"train": 64, "test": 6})
    work = str(tmp_path / "demo")
    results = demo.main(["--work", work, "--quick", "--captions", "4", "--name", "second",
                         "--annotations", f"train={src}/captions_train.json",
                         f"test={src}/captions_test.json",
                         "--vqa", f"train={src}/vqa_train.json", f"test={src}/vqa_test.json",
                         "--image-root", f"{src}/images"])
    out = capsys.readouterr().out
    for stage, terms in (("stage1", ("itc", "itg")), ("stage2", ("lm",))):
        rows = _rows(os.path.join(work, stage, "metrics.jsonl"))
        for k in terms:
            assert np.mean([r[k] for r in rows[-3:]]) < rows[0][k], (stage, k)
        with open(os.path.join(work, stage, "config.json")) as f:
            config = json.load(f)["config"]
        assert config["data"]["train"]["name"] == "blip2_captions/second"
    # The vocabularies are the tokenizers fitted to this dataset: no test word is unknown.
    tok_dir = os.path.join(work, "data", "tokenizers", "second")
    qtok = processing.load_tokenizer(os.path.join(tok_dir, "qformer"), "qformer")
    assert config["model_overrides"]["qformer"]["vocab_size"] == len(qtok)
    with open(f"{src}/captions_test.json") as f:
        caption = json.load(f)[0]["caption"][0]
    ids, _ = processing.tokenize_prompts(qtok, caption, kind="qformer")
    assert qtok.unk_token_id not in ids[0]
    assert "masked patches of 64 training images" in out
    assert results["test_images"] == 6 and results["test_texts"] == 30
    for k in ("retrieval_r1_i2t", "retrieval_r1_t2i", "itm_rerank_r1_i2t", "vqa_zero_shot",
              "vqa_answer_prior", "vqa_chance"):
        assert 0 <= results[k] <= 1, k
    # Kinds are the questions' first two words; 6 images x 3 questions.
    kinds = results["vqa_by_kind"]
    assert set(kinds) <= {"how many", "what color", "what pattern", "is there", "where is"}
    assert sum(v["questions"] for v in kinds.values()) == 18
    assert results["captions_total"] == 4
    for e in results["examples"]:        # right means equal to one of the references
        with open(f"{src}/captions_test.json") as f:
            refs = {r["image_id"]: r["caption"] for r in json.load(f)}
        assert e["right"] == (e["generated"].strip() in refs[e["image_id"]])


def test_demo_refuses_incomplete_own_data_arguments(tmp_path, capsys):
    for argv, words in ((["--annotations", "train=a.json", "test=b.json"], "--image-root"),
                        (["--annotations", "train=a.json", "--image-root", str(tmp_path)],
                         "needs a train and a test split"),
                        (["--vqa", "train=a.json", "test=b.json"], "go with --annotations")):
        with pytest.raises(SystemExit) as e:
            demo.main(["--work", str(tmp_path / "w")] + argv)
        assert e.value.code == 2 and words in capsys.readouterr().err, argv
    assert not os.path.exists(tmp_path / "w")
