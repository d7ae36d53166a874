"""The main job on a user's own data (`python -m blip2_jax.demo --annotations ... --vqa ...
--image-root DIR --quick`), on LAVIS JSON written by bench/second_dataset.py (another renderer,
other concepts), and its argument checks."""
import json
import os
import sys

import numpy as np
import pytest

import runs
from blip2_jax import demo, processing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import second_dataset  # noqa: E402  (bench/: the second generator)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_demo_runs_on_your_own_data(tmp_path):
    """`--annotations` (LAVIS JSON of a dataset made by another renderer, with other concepts):
    the dataset and tokenizers fitted to its training text are built, the towers pre-trained
    without labels, both stages trained (their losses fall) and every figure produced; and
    `--vqa-finetune` fine-tunes and scores stage 2 on its questions."""
    src = str(tmp_path / "second")
    second_dataset.write(src, {"train": 64, "test": 6})
    work = str(tmp_path / "demo")
    results, out = runs.demo(["--work", work, "--quick", "--captions", "4", "--name", "second",
                              "--vqa-finetune",
                              "--annotations", f"train={src}/captions_train.json",
                              f"test={src}/captions_test.json",
                              "--vqa", f"train={src}/vqa_train.json", f"test={src}/vqa_test.json",
                              "--image-root", f"{src}/images"])
    for stage, terms in (("stage1", ("itg",)), ("stage2", ("lm",))):
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
    # --vqa-finetune: the question-aware fine-tune from stage 2, on the same questions.
    assert 0 <= results["vqa_finetuned"] <= 1
    assert abs(results["vqa_finetuned"] - sum(v["finetuned"] * v["questions"]
                                              for v in kinds.values()) / 18) < 1e-6
    with open(os.path.join(work, "vqa_ft", "config.json")) as f:
        tuned = json.load(f)["config"]
    assert tuned["data"]["train"]["name"] == "blip2_vqa/second"
    assert tuned["model_overrides"]["qformer_text_input"] is True
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
