"""Official VQAv2 accuracy (vqaEval.py rules), GQA exact match and the OK-VQA lemmatiser hook."""
import sys
import types

import pytest

from blip2_jax.metrics.vqa import (ARTICLES, CONTRACTIONS, MANUAL_MAP, PUNCTUATION, exact_match,
                                   normalize_answer, process_digit_article, process_punctuation,
                                   spacy_lemmatizer, vqa_accuracy, vqa_score)


# ----------------------------------------------------------------------------------------------
# normalisation: processPunctuation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    # no space next to the mark and no digit-comma: the mark becomes a space
    ("yes!", "yes "),
    ("t-shirt", "t shirt"),
    ("on/off", "on off"),
    ("(red)", " red "),
    ('"hi"', " hi "),
    ("a;b=c+d", "a b c d"),
    ("x[y]{z}", "x y  z "),
    ("a\\b_c>d<e@f`g?h", "a b c d e f g h"),
    # the mark is next to a space somewhere in the ORIGINAL text: that mark is deleted everywhere
    ("hello, world", "hello world"),
    ("yes/no / maybe", "yesno  maybe"),
    ("red (dark)", "red dark "),           # "(" deleted (" (" present), ")" spaced
    ("x -y", "x y"),
    # a comma between two digits anywhere: ALL listed marks are deleted, none spaced
    ("1,000", "1000"),
    ("1,000-2", "10002"),
    ("1,5 (a)", "15 a"),
    ("a,b", "a b"),                        # comma not between digits: spaced
    # not in the official list: kept
    ("don't", "don't"),
    ("10:30", "10:30"),
    ("50% #1 $2 & 3*4 ^~|", "50% #1 $2 & 3*4 ^~|"),
    # periods: removed unless a digit follows
    ("yes.", "yes"),
    ("e.g.", "eg"),
    ("2.5", "2.5"),
    ("2.", "2"),
    ("1.5.", "1.5"),
    (".5", ".5"),
    ("a.b", "ab"),
    ("3. 4", "3 4"),
    # case and whitespace are untouched here
    ("  Yes  ", "  Yes  "),
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_removes_at_most_32_periods():
    # official: periodStrip.sub("", outText, re.UNICODE) -> re.UNICODE (32) lands in `count`
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("." * 32) == ""
    assert process_punctuation("a." * 33) == "a" * 32 + "a."


# ----------------------------------------------------------------------------------------------
# normalisation: processDigitArticle
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("word, digit", [
    ("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
    ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10"),
])
def test_number_words(word, digit):
    assert process_digit_article(word) == digit
    assert process_digit_article(word.upper() + " dogs") == digit + " dogs"


@pytest.mark.parametrize("text, expected", [
    ("eleven", "eleven"), ("twenty", "twenty"), ("someone", "someone"),   # not in the map
    ("a dog", "dog"), ("an apple", "apple"), ("the cat", "cat"),          # each article
    ("The Cat", "cat"), ("A", ""), ("the a an", ""),
    ("banana", "banana"), ("anthem", "anthem"), ("theater", "theater"),   # only whole words
    ("a one", "1"),                          # number mapping happens before article removal
    ("YES", "yes"), ("Red Car", "red car"),  # lower-casing
    ("  red \t car\n ", "red car"),          # split on any whitespace, single spaces
])
def test_digit_article(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize("word, expected", [
    ("dont", "don't"), ("isnt", "isn't"), ("cant", "can't"), ("whats", "what's"),
    ("youre", "you're"), ("oclock", "o'clock"), ("yall'll", "y'all'll"), ("twas", "'twas"),
    ("couldnt've", "couldn't've"), ("Wont", "won't"),
    ("somebody'd", "somebodyd"),   # official table oddity, reproduced
    ("Im", "im"), ("Ive", "ive"),  # capitalised keys are unreachable (words are lower-cased)
    ("don't", "don't"),            # already contracted: unchanged
])
def test_contractions(word, expected):
    assert process_digit_article(word) == expected
    assert process_digit_article(f"the {word} a") == expected


def test_tables_match_official_sizes():
    assert len(CONTRACTIONS) == 120
    assert len(MANUAL_MAP) == 12
    assert ARTICLES == ("a", "an", "the")
    assert len(PUNCTUATION) == 21 and "." not in PUNCTUATION and "'" not in PUNCTUATION
    assert ":" not in PUNCTUATION


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"),
    ("  two dogs\n", "2 dogs"),
    ("the\tred\nbus", "red bus"),
    ("A t-shirt!", "t shirt"),
    ("1,000 dollars.", "1000 dollars"),
    ("Dont know", "don't know"),
    ("It's 2.5 inches", "it's 2.5 inches"),
    ("\n\t", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# ----------------------------------------------------------------------------------------------
# leave-one-out accuracy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, expected", [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0), (10, 1.0)])
def test_leave_one_out_values(k, expected):
    # hand: k subsets leave a match out (k-1 left), 10-k keep all k:
    # (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
    hand = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10 if k else 0.0
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_score("cat", answers) == pytest.approx(expected, abs=1e-12)
    assert hand == pytest.approx(expected, abs=1e-12)
    res = vqa_accuracy({1: answers}, {1: "cat"})
    assert res == {"overall": round(100 * expected, 2), "num_questions": 1}


def test_multi_question_average_and_answer_types():
    refs = {
        1: ["cat"] * 1 + ["dog"] * 9,      # 0.3
        2: ["red"] * 3 + ["blue"] * 7,     # 0.9
        3: ["yes"] * 10,                   # 1.0
        4: ["2"] * 10,                     # 0.0
        5: ["no"] * 2 + ["yes"] * 8,       # 0.6
    }
    preds = {1: "cat", 2: "Red.", 3: "yes", 4: "three", 5: "No"}
    types = {1: "other", 2: "other", 3: "yes/no", 4: "number", 5: "yes/no", 99: "unused"}
    res = vqa_accuracy(refs, preds, types)
    assert res["overall"] == pytest.approx(100 * (0.3 + 0.9 + 1.0 + 0.0 + 0.6) / 5)
    assert res["num_questions"] == 5
    assert res["per_answer_type"] == pytest.approx({"other": 60.0, "yes/no": 80.0, "number": 0.0})
    qtypes = {1: "what", 2: "what color", 3: "is", 4: "how many", 5: "is"}
    res = vqa_accuracy(refs, preds, question_types=qtypes, per_question=True)
    assert res["per_question_type"] == pytest.approx(
        {"what": 30.0, "what color": 90.0, "is": 80.0, "how many": 0.0})
    assert res["per_question"] == pytest.approx({1: 30.0, 2: 90.0, 3: 100.0, 4: 0.0, 5: 60.0})
    assert "per_answer_type" not in res


def test_rounding_like_official_n2():
    refs = {1: ["a1"] * 10, 2: ["b2"] * 10, 3: ["c3"] * 10}
    preds = {1: "a1", 2: "x", 3: "y"}
    assert vqa_accuracy(refs, preds)["overall"] == 33.33
    assert vqa_accuracy(refs, preds, ndigits=None)["overall"] == pytest.approx(100 / 3)


# ----------------------------------------------------------------------------------------------
# ground-truth processing: processPunctuation only, and only if the answers differ
# ----------------------------------------------------------------------------------------------
def test_gt_punctuation_only_when_answers_differ():
    # all identical -> the gt answers are NOT processed: "yes." never equals a normalised prediction
    assert vqa_score("yes.", ["yes."] * 10) == 0.0
    assert vqa_score("yes", ["yes."] * 10) == 0.0
    # not all identical -> processPunctuation on every gt answer: "yes." -> "yes"
    assert vqa_score("yes.", ["yes."] * 9 + ["yes"]) == 1.0
    assert vqa_score("yes", ["yes."] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_score("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)


def test_gt_never_lowercased_digit_mapped_or_article_stripped():
    assert vqa_score("two", ["two"] * 10) == 0.0              # prediction becomes "2"
    assert vqa_score("two", ["two"] * 5 + ["2"] * 5) == 1.0   # matches the five "2"
    assert vqa_score("Yes", ["Yes"] * 4 + ["no"] * 6) == 0.0  # gt keeps its capital
    # gt keeps its article: only the single bare "dog" matches the normalised "dog"
    assert vqa_score("a dog", ["a dog"] * 9 + ["dog"]) == pytest.approx(0.3)
    assert vqa_score("the dog", ["dog"] * 3 + ["a dog"] * 7) == pytest.approx(0.9)


def test_vqa_master_rules():
    # GT-Vision-Lab/VQA master (2021): no normalisation at all when the answers are identical...
    assert vqa_score("yes.", ["yes."] * 10, rules="vqa-master") == 1.0
    assert vqa_score("Yes", ["yes"] * 10, rules="vqa-master") == 0.0
    assert vqa_score("Yes", ["yes"] * 10) == 1.0               # (lavis rules differ)
    assert vqa_score(" yes\n", ["yes"] * 10, rules="vqa-master") == 1.0  # but strip is applied
    # ...and full normalisation of answers AND prediction when they differ
    assert vqa_score("two", ["two"] * 5 + ["3"] * 5, rules="vqa-master") == 1.0
    assert vqa_score("Yes", ["Yes"] * 4 + ["no"] * 6, rules="vqa-master") == 1.0
    res = vqa_accuracy({1: ["yes."] * 10}, {1: "yes."}, rules="vqa-master")
    assert res["overall"] == 100.0
    with pytest.raises(ValueError, match="rules"):
        vqa_accuracy({1: ["a"] * 10}, {1: "a"}, rules="v1")


def test_other_answer_counts():
    with pytest.raises(ValueError, match=r"exactly 10 .*'q2'.* with 3"):
        vqa_accuracy({"q1": ["a"] * 10, "q2": ["a"] * 3}, {"q1": "a", "q2": "a"})
    # num_answers=None: the same formula over n leave-one-out subsets, threshold still 3
    res = vqa_accuracy({1: ["cat"] * 3}, {1: "cat"}, num_answers=None, ndigits=None)
    assert res["overall"] == pytest.approx(100 * 2 / 3)
    res = vqa_accuracy({1: ["cat"] * 4 + ["dog"]}, {1: "cat"}, num_answers=None, ndigits=None)
    assert res["overall"] == pytest.approx(100 * (4 * 1.0 + 1 * 1.0) / 5)
    res = vqa_accuracy({1: ["cat"] * 2 + ["dog"] * 3}, {1: "cat"}, num_answers=5, ndigits=None)
    assert res["overall"] == pytest.approx(100 * (2 * (1 / 3) + 3 * (2 / 3)) / 5)
    with pytest.raises(ValueError, match="always score 0"):
        vqa_accuracy({1: ["cat"]}, {1: "cat"}, num_answers=None)
    with pytest.raises(ValueError, match="at least 2"):
        vqa_score("cat", [])


# ----------------------------------------------------------------------------------------------
# input errors
# ----------------------------------------------------------------------------------------------
def test_missing_and_extra_question_ids():
    refs = {i: ["a"] * 10 for i in range(8)}
    with pytest.raises(ValueError, match=r"2 question id\(s\) of the references.*e\.g\. 3, 5"):
        vqa_accuracy(refs, {i: "a" for i in range(8) if i not in (3, 5)})
    with pytest.raises(ValueError, match=r"1 question id\(s\) in predictions are not.*42"):
        vqa_accuracy(refs, {**{i: "a" for i in range(8)}, 42: "a"})
    with pytest.raises(ValueError, match="differ only in type"):
        vqa_accuracy(refs, {str(i): "a" for i in range(8)})
    with pytest.raises(ValueError, match=r"answer_types has no entry .*7"):
        vqa_accuracy(refs, {i: "a" for i in range(8)}, {i: "other" for i in range(7)})
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy({}, {})


def test_bad_value_types():
    with pytest.raises(ValueError, match=r"predictions must be strings.*\b1\b"):
        vqa_accuracy({1: ["a"] * 10}, {1: ["a"]})
    with pytest.raises(ValueError, match="list of answer strings"):
        vqa_accuracy({1: "a"}, {1: "a"})
    with pytest.raises(ValueError, match="list of answer strings"):
        vqa_accuracy({1: [1] * 10}, {1: "1"})
    with pytest.raises(ValueError, match="single answer string"):
        exact_match({1: ["a"]}, {1: "a"})


# ----------------------------------------------------------------------------------------------
# GQA exact match (LAVIS GQATask: processPunctuation + processDigitArticle on the prediction only)
# ----------------------------------------------------------------------------------------------
def test_exact_match_gqa():
    refs = {"a": "yes", "b": "2", "c": "table", "d": "Yes", "e": "t shirt", "f": "left"}
    preds = {"a": "Yes.", "b": "two", "c": "the table", "d": "Yes", "e": "T-shirt", "f": "right"}
    res = exact_match(refs, preds)
    # d: the gt is not normalised, the prediction becomes "yes" != "Yes"; f: wrong
    assert res == {"accuracy": pytest.approx(100 * 4 / 6), "num_questions": 6}
    raw = exact_match(refs, preds, normalize=False)
    assert raw["accuracy"] == pytest.approx(100 * 1 / 6)   # only d
    assert exact_match(refs, preds, ndigits=2)["accuracy"] == 66.67
    with pytest.raises(ValueError, match=r"'f'"):
        exact_match(refs, {k: v for k, v in preds.items() if k != "f"})


# ----------------------------------------------------------------------------------------------
# OK-VQA lemmatisation hook
# ----------------------------------------------------------------------------------------------
def test_lemmatize_hook_applied_to_raw_prediction_first():
    seen = []

    def lemmatize(s):
        seen.append(s)
        return {"Dogs!": "dog", "benches": "bench"}.get(s, s)

    refs = {1: ["dog"] * 10, 2: ["bench"] * 3 + ["seat"] * 7}
    preds = {1: "Dogs!", 2: "benches"}
    assert vqa_accuracy(refs, preds)["overall"] == 0.0
    res = vqa_accuracy(refs, preds, lemmatize=lemmatize)
    assert res["overall"] == pytest.approx(100 * (1.0 + 0.9) / 2)
    assert seen == ["Dogs!", "benches"]
    assert exact_match({1: "bench"}, {1: "benches"}, lemmatize=lemmatize)["accuracy"] == 100.0


def test_spacy_lemmatizer_logic_with_fake_pipeline():
    tok = types.SimpleNamespace
    table = {"dogs": ("NOUN", "dog"), "ran": ("VERB", "run"), "faster": ("ADV", "fast"),
             "The": ("DET", "the"), "n't": ("PART", "not")}

    def nlp(text):
        return [tok(text=w, pos_=table[w][0], lemma_=table[w][1]) for w in text.split()]

    lem = spacy_lemmatizer(nlp=nlp)
    # NOUN/VERB -> lemma, everything else keeps its text, joined by single spaces (LAVIS)
    assert lem("The dogs ran faster n't") == "The dog run faster n't"


def test_spacy_lemmatizer_without_spacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)   # makes `import spacy` fail
    with pytest.raises(ImportError, match="spaCy"):
        spacy_lemmatizer()
