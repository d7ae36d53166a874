"""The main job end to end (`python -m blip2_jax.demo --quick`: every step of the real recipe on
a small dataset with a few dozen steps per stage), and loss-curve sanity: its losses fall."""
import json
import os

import numpy as np

from blip2_jax import demo


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_demo_runs_end_to_end_and_its_losses_fall(tmp_path, capsys):
    work = str(tmp_path / "demo")
    results = demo.main(["--work", work, "--quick", "--captions", "8"])
    for stage, terms in (("stage1", ("itc", "itg")), ("stage2", ("lm",))):
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
    assert results["test_images"] == 10 and results["chance_i2t"] == 1 / 10
    assert 0 <= results["image_to_text_R@1"] <= 1 and 0 <= results["captions_right"] <= 1
    assert results["captioned_images"] == 8
    n_right = round(results["captions_right"] * 8)       # examples: up to 4 right, 2 wrong
    assert [e["right"] for e in results["examples"]] == ([True] * min(4, n_right)
                                                         + [False] * min(2, 8 - n_right))
    with open(os.path.join(work, "results.json")) as f:
        assert json.load(f)["text_to_image_R@1"] == results["text_to_image_R@1"]
    out = capsys.readouterr().out
    assert "held-out retrieval R@1" in out and "captions right" in out
    # The configs' evaluators ran and wrote a report per stage.
    assert {"retrieval_test", "caption_test", "vqa_test"} <= set(results["evaluators"])
    assert results["evaluators"]["retrieval_test"]["images"] == 10
    for report in results["reports"]:
        assert os.path.isfile(report) and report in out
    # A re-run finds every stage done and only evaluates again, to the same figures.
    again = demo.main(["--work", work, "--quick", "--captions", "8"])
    assert again["image_to_text_R@1"] == results["image_to_text_R@1"]
    assert "1/5" not in capsys.readouterr().out
