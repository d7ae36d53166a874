"""The main job end to end (`python -m blip2_jax.demo --quick` as a user runs it, on one CPU
device: every step of the real recipe on a small dataset with 12 steps per stage), and loss-curve
sanity: its losses fall."""
import json
import os

import numpy as np

import runs


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_demo_runs_end_to_end_and_its_losses_fall(tmp_path):
    work = str(tmp_path / "demo")
    results, out = runs.demo(["--work", work, "--quick", "--captions", "8", "--ablation"])
    # ITC is not among them: in 12 steps it moves by ~1e-4 from log(batch) (a fresh Q-Former's
    # image features hardly differ yet); the full run's retrieval figures show it learning.
    for stage, terms in (("stage1", ("itg",)), ("stage2", ("lm",)),
                         ("stage2_fresh", ("lm",))):
        rows = _rows(os.path.join(work, stage, "metrics.jsonl"))
        assert rows[-1]["step"] == 12
        for k in terms:              # the mean of the last 3 logs is below the first log
            assert np.mean([r[k] for r in rows[-3:]]) < rows[0][k], (stage, k)
        assert os.path.isdir(os.path.join(work, stage, "final"))
    # Both stages trained from one frozen-feature cache of the ViT (stage 1 computed it).
    with open(os.path.join(work, "features/blip2_captions/synthetic/train/meta.json")) as f:
        assert json.load(f)["images"] == 256
    configs = {}
    for stage in ("stage1", "stage2"):
        with open(os.path.join(work, stage, "config.json")) as f:
            configs[stage] = json.load(f)["config"]
        assert configs[stage]["data"]["features"] == os.path.join(work, "features")
    # ITM re-ranks ITC's best ceil(128 * 10 / 1000) = 2 candidates (LAVIS's 128 of Flickr30k's
    # 1000 test images, scaled to these 10).
    assert configs["stage1"]["eval"]["evaluators"]["retrieval_test"]["k"] == 2
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
    # Each phase's wall time, numbered as the demo announced it.
    phases = ["data", "unimodal", "stage1", "stage2", "stage2_fresh", "evaluation"]
    assert list(results["phase_seconds"]) == phases
    # Seven figures rounded to 0.1 s (six phases and the total), each off by up to 0.05 s.
    assert abs(results["seconds"] - sum(results["phase_seconds"].values())) <= 0.05 * 7 + 1e-9
    assert "held-out retrieval R@1 by ITC" in out
    assert f"captions fully right: {n_right} of 8 held-out images" in out
    assert "{'" not in out                    # every figure labelled, no dict printed as is
    # The silent phases say what they do; stage 2 names the stage-1 model it starts from.
    for words in ("] 1/6 building the synthetic dataset", "] 6/6 evaluating",
                  "] 5/6 stage 2 from a fresh Q-Former", "building the frozen-feature cache",
                  "compiling the training step",
                  f"<- stage-1 model {work}/stage1/final"):
        assert words in out, words
    # The configs' evaluators ran and wrote a report per stage.
    assert {"retrieval_test", "caption_test", "vqa_test"} <= set(results["evaluators"])
    assert results["evaluators"]["retrieval_test"]["images"] == 10
    assert results["evaluators"]["caption_test"]["images"] == 8     # --captions 8
    for report in results["reports"]:
        assert os.path.isfile(report) and report in out
