"""`python -m blip2_jax.metrics {caption,vqa,gqa}`: one JSON object on stdout, exit 2 on bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blip2_jax.metrics import __main__ as metrics_main
from blip2_jax.metrics.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "blip2_jax.metrics", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


VQA_REFS = {"1": ["cat"] + ["dog"] * 9,    # "cat": 0.3
            "2": ["2"] * 10,               # "two" -> "2": 1.0
            "3": ["yes"] * 2 + ["no"] * 8}  # "Yes." -> "yes": 0.6


def test_vqa_dict_files(tmp_path):
    r = run_cli("vqa", "--references", write(tmp_path, "r.json", VQA_REFS),
                "--predictions", write(tmp_path, "p.json", {"1": "cat", "2": "two", "3": "Yes."}),
                "--answer-types", write(tmp_path, "t.json",
                                        {"1": "other", "2": "number", "3": "yes/no"}))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)          # the whole stdout is one JSON object
    assert out == {"overall": 63.33, "num_questions": 3,
                   "per_answer_type": {"other": 30.0, "number": 100.0, "yes/no": 60.0}}


def test_vqa_official_annotation_and_result_list(tmp_path):
    # official VQA annotation file (answer dicts, answer/question types) + results list
    anns = {"annotations": [
        {"question_id": qid, "answer_type": t, "question_type": "what",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(VQA_REFS[str(qid)])]}
        for qid, t in [(1, "other"), (2, "number"), (3, "yes/no")]]}
    preds = [{"question_id": 1, "answer": "cat"}, {"question_id": 2, "answer": "two"},
             {"question_id": 3, "answer": "Yes."}]
    r = run_cli("vqa", "--references", write(tmp_path, "anns.json", anns),
                "--predictions", write(tmp_path, "res.json", preds))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["overall"] == 63.33
    assert out["per_answer_type"] == {"other": 30.0, "number": 100.0, "yes/no": 60.0}
    assert out["per_question_type"] == {"what": 63.33}


def test_gqa_lavis_result_file(tmp_path):
    # a LAVIS GQA result file holds both the prediction and the ground truth
    res = [{"question_id": 1, "pred_ans": "Yes.", "gt_ans": "yes"},
           {"question_id": 2, "pred_ans": "the table", "gt_ans": "table"},
           {"question_id": 3, "pred_ans": "left", "gt_ans": "right"}]
    f = write(tmp_path, "gqa.json", res)
    r = run_cli("gqa", "--references", f, "--predictions", f)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["num_questions"] == 3
    assert out["accuracy"] == pytest.approx(200 / 3)


def test_caption_real_module(tmp_path):
    refs = {"1": ["a dog runs on the grass", "a brown dog running"],
            "2": ["two cats sleep on a sofa", "cats sleeping"]}
    preds = [{"image_id": 1, "caption": "a dog runs on the grass"},
             {"image_id": 2, "caption": "a red car"}]
    r = run_cli("caption", "--references", write(tmp_path, "r.json", refs),
                "--predictions", write(tmp_path, "p.json", preds), "--no-meteor")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(out)
    assert "METEOR" not in out
    assert 0.0 < out["Bleu_1"] < 1.0


def test_caption_arguments_and_numpy_output(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(references, predictions, *, tokenize="python", meteor=True):
        calls.append((references, predictions, tokenize, meteor))
        return {"CIDEr": np.float64(1.25), "Bleu_4": np.float32(0.5)}

    monkeypatch.setattr(metrics_main, "caption_metrics", fake)
    anns = {"annotations": [{"image_id": 7, "caption": "a b"}, {"image_id": 7, "caption": "c"}]}
    rc = main(["caption", "--references", str(write(tmp_path, "r.json", anns)),
               "--predictions", str(write(tmp_path, "p.json", {"7": "a b"})),
               "--tokenize", "java", "--no-meteor"])
    assert rc == 0
    assert calls == [({"7": ["a b", "c"]}, {"7": "a b"}, "java", False)]
    assert json.loads(capsys.readouterr().out) == {"CIDEr": 1.25, "Bleu_4": 0.5}


@pytest.mark.parametrize("case, needle", [
    ("missing_file", "no such file"),
    ("bad_json", "not valid JSON"),
    ("wrong_shape", "expected an object"),
    ("missing_qid", "have no entry in predictions"),
    ("nine_answers", "exactly 10"),
    ("record_without_id", "has no 'question_id'"),
    ("non_string_prediction", "expected a string"),
])
def test_vqa_bad_input_exit_2(tmp_path, capsys, case, needle):
    # in-process for speed (each subprocess imports jax); the process exit is checked below
    refs = write(tmp_path, "r.json", VQA_REFS)
    preds = {"1": "cat", "2": "two", "3": "yes"}
    if case == "missing_file":
        refs = tmp_path / "nope.json"
    elif case == "bad_json":
        refs = write(tmp_path, "r.json", "{\"1\": [")
    elif case == "wrong_shape":
        refs = write(tmp_path, "r.json", "42")
    elif case == "missing_qid":
        del preds["3"]
    elif case == "nine_answers":
        refs = write(tmp_path, "r.json", {**VQA_REFS, "3": ["yes"] * 9})
    elif case == "record_without_id":
        preds = [{"qid": 1, "answer": "cat"}]
    elif case == "non_string_prediction":
        preds["2"] = 2
    rc = main(["vqa", "--references", str(refs),
               "--predictions", str(write(tmp_path, "p.json", preds))])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert needle in err
    named = "p.json" if case in ("record_without_id", "non_string_prediction") else refs.name
    assert named in err


def test_bad_input_process_exit_status_2(tmp_path):
    r = run_cli("vqa", "--references", write(tmp_path, "r.json", "{\"1\": ["),
                "--predictions", write(tmp_path, "p.json", {"1": "cat"}))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert "r.json" in r.stderr and "not valid JSON" in r.stderr


def test_caption_and_gqa_bad_input_exit_2(tmp_path, capsys):
    rc = main(["caption", "--references", str(write(tmp_path, "r.json", {"1": [3]})),
               "--predictions", str(write(tmp_path, "p.json", {"1": "x"}))])
    err = capsys.readouterr().err
    assert rc == 2 and "r.json" in err and "list of strings" in err
    rc = main(["gqa", "--references", str(write(tmp_path, "g.json", {"1": ["a", "b"]})),
               "--predictions", str(write(tmp_path, "p.json", {"1": "a"}))])
    err = capsys.readouterr().err
    assert rc == 2 and "g.json" in err and "single answer string" in err
    rc = main(["caption", "--references", str(write(tmp_path, "r2.json", {"1": ["x"]})),
               "--predictions", str(write(tmp_path, "p2.json", {"2": "x"}))])
    assert rc == 2 and "p2.json" in capsys.readouterr().err


def test_in_process_errors(tmp_path, capsys):
    # duplicate ids with different answers, unknown subcommand, bad --num-answers
    preds = [{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}]
    rc = main(["vqa", "--references", str(write(tmp_path, "r.json", {"1": ["a"] * 10})),
               "--predictions", str(write(tmp_path, "p.json", preds))])
    assert rc == 2 and "more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bleu"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["vqa", "--references", "r", "--predictions", "p", "--num-answers", "1"])
    assert e.value.code == 2
    rc = main(["vqa", "--references", str(write(tmp_path, "r3.json", {"1": ["cat"] * 3})),
               "--predictions", str(write(tmp_path, "p3.json", {"1": "cat"})),
               "--num-answers", "any"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["overall"] == 66.67
