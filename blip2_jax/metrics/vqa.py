"""VQA metrics: the official VQAv2 accuracy, GQA exact match, and the OK-VQA lemmatisation hook.

Reproduces ``vqaEval.py`` of the official VQA API (github.com/GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``), in the version LAVIS vendors as
``lavis/common/vqa_tools/vqa_eval.py`` and uses for VQAv2 and OK-VQA.

Per question (official ``VQAEval.evaluate`` as LAVIS vendors it, i.e. GT-Vision-Lab/VQA from
2016 to March 2021; master has since changed the normalisation, available as
``rules="vqa-master"``, see :func:`vqa_score`):

* the **prediction** is normalised: ``\\n``/``\\t`` → space, ``strip()``, then
  :func:`process_punctuation`, then :func:`process_digit_article` (lower-case, number words →
  digits, articles dropped, contractions restored);
* the **ground-truth answers** are *not* fully normalised: only when the question's answers are
  not all identical (``len(set(gtAnswers)) > 1``) is :func:`process_punctuation` applied to each of
  them; they are never lower-cased, digit-mapped or article-stripped. (The VQA annotations are
  already normalised by the dataset authors, so this matters only for hand-made references: a
  reference ``"two"`` can never match, because every prediction ``"two"`` becomes ``"2"``.)
* accuracy = mean over the leave-one-out subsets (each subset = all answers but one) of
  ``min(1, #answers in the subset equal to the prediction / 3)``. With the usual 10 answers of which
  ``k`` equal the prediction this is ``(k·min(1,(k-1)/3) + (10-k)·min(1,k/3)) / 10``, i.e.
  0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, ≥4. (The official loop removes "the" left-out answer by
  dict inequality; the VQA answer dicts carry a unique ``answer_id``, so exactly one is removed —
  here: by position.)

Reported numbers are **percentages** (×100) as in the official script and LAVIS; the official
script rounds them to ``n=2`` decimals (``ndigits``). OK-VQA is scored with the same function
(its annotations also have 10 answers per question); LAVIS additionally lemmatises OK-VQA
*predictions* (see :func:`spacy_lemmatizer`). GQA uses :func:`exact_match`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from blip2_jax.metrics import MetricInputError

__all__ = ["ARTICLES", "CONTRACTIONS", "MANUAL_MAP", "PUNCTUATION", "RULES", "exact_match",
           "normalize_answer", "process_digit_article", "process_punctuation",
           "spacy_lemmatizer", "vqa_accuracy", "vqa_score"]

# ----------------------------------------------------------------------------------------------
# Tables, verbatim from the official vqaEval.py (including its oddities: the capitalised keys
# "Id've", "I'dve", "Im", "Ive" can never match because words are lower-cased first, and
# "somebody'd" maps to "somebodyd").
# ----------------------------------------------------------------------------------------------
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# Note: ":", "'", "*", "#", "$", "%", "&", "^", "~", "|" are NOT in the official list; "." is
# handled separately by _PERIOD_STRIP.
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                                "-", ">", "<", "@", "`", ",", "?", "!")
# "(?!<=\d)" is a (buggy) negative *lookahead* for the literal "<=" + digit, not a lookbehind: at
# a "." it can never match, so a period is removed unless a digit FOLLOWS it ("2.5" keeps its
# period, "2." and "e.g." lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is ``periodStrip.sub("", outText, re.UNICODE)``: the third positional argument
# of Pattern.sub is *count*, so at most int(re.UNICODE) == 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    For each punctuation mark ``p`` (in list order): if the *original* text contains ``p``
    followed or preceded by a space, or contains a comma between two digits anywhere, ``p`` is
    deleted; otherwise it is replaced by a space. Then periods not followed by a digit are
    deleted (at most 32 of them). Case and whitespace are otherwise untouched.
    """
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, map number words
    ("none"/"zero".."ten") to digits, drop the articles a/an/the, restore contractions
    ("dont" → "don't"), join with single spaces."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The full normalisation the official script applies to a *prediction*:
    ``\\n``/``\\t`` → space, strip, :func:`process_punctuation`, :func:`process_digit_article`."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


RULES = ("lavis", "vqa-master")


def vqa_score(prediction: str, answers: Sequence[str], *, rules: str = "lavis") -> float:
    """Official accuracy of one prediction against one question's ground-truth answers, as a
    fraction in [0, 1] (see the module docstring for the exact rules).

    With ``n`` answers of which ``k`` equal the prediction (after normalisation) the result is
    ``(k·min(1, (k-1)/3) + (n-k)·min(1, k/3)) / n``. ``n`` must be ≥ 2: with a single answer
    every leave-one-out subset is empty and the official formula always gives 0.

    ``rules`` picks the version of the official script:

    * ``"lavis"`` (default): ``vqaEval.py`` as in GT-Vision-Lab/VQA from 2016 until March 2021
      and as vendored by LAVIS (the numbers BLIP-2 reports): the prediction is always fully
      normalised; the answers get ``processPunctuation`` only if they are not all identical.
    * ``"vqa-master"``: GT-Vision-Lab/VQA master since commit a013f00 (2021-03-11, "Fixed
      processing answers bug"): answers and prediction get ``\\n``/``\\t`` → space and strip;
      then, only if the (stripped) answers are not all identical, *both* the answers and the
      prediction get ``processPunctuation`` + ``processDigitArticle``; otherwise neither is
      normalised further.
    """
    answers = list(answers)
    if len(answers) < 2:
        raise MetricInputError(
            f"need at least 2 ground-truth answers, got {len(answers)}: with one answer the "
            "leave-one-out VQA formula always scores 0 (use exact_match for single answers)")
    if rules == "lavis":
        pred = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
    elif rules == "vqa-master":
        answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        pred = prediction.replace("\n", " ").replace("\t", " ").strip()
        if len(set(answers)) > 1:
            answers = [process_digit_article(process_punctuation(a)) for a in answers]
            pred = process_digit_article(process_punctuation(pred))
    else:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    matches = [a == pred for a in answers]
    total = sum(matches)
    # leave answer i out: the other answers match (total - matches[i]) times
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(answers)


def _check_ids(references: Mapping, predictions: Mapping, what: str = "predictions") -> None:
    missing = [q for q in references if q not in predictions]
    extra = [q for q in predictions if q not in references]
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} question id(s) of the references have no entry in {what} "
                     f"(e.g. {_some(missing)})")
    if extra:
        parts.append(f"{len(extra)} question id(s) in {what} are not in the references "
                     f"(e.g. {_some(extra)})")
    msg = "; ".join(parts)
    ref_str = {str(q) for q in references}
    if {str(q) for q in predictions} & ref_str and not (set(predictions) & set(references)):
        msg += " — the ids differ only in type (e.g. int vs str); convert them to one type"
    raise MetricInputError(msg)


def _some(ids: Sequence, n: int = 5) -> str:
    shown = ", ".join(repr(q) for q in list(ids)[:n])
    return shown + (", ..." if len(ids) > n else "")


def _check_predictions(predictions: Mapping) -> None:
    bad = [q for q, p in predictions.items() if not isinstance(p, str)]
    if bad:
        raise MetricInputError(f"predictions must be strings; not for question id(s) {_some(bad)} "
                               f"(e.g. {predictions[bad[0]]!r})")


def _round(x: float, ndigits: int | None) -> float:
    return x if ndigits is None else round(x, ndigits)


def _group_means(scores: Mapping[Hashable, float], groups: Mapping[Hashable, Any],
                 name: str, ndigits: int | None) -> dict[str, float]:
    missing = [q for q in scores if q not in groups]
    if missing:
        raise MetricInputError(f"{name} has no entry for {len(missing)} question id(s) "
                               f"(e.g. {_some(missing)})")
    buckets: dict[str, list[float]] = {}
    for q, s in scores.items():
        buckets.setdefault(str(groups[q]), []).append(s)
    return {g: _round(100.0 * sum(v) / len(v), ndigits) for g, v in buckets.items()}


def vqa_accuracy(references: Mapping[Hashable, Sequence[str]],
                 predictions: Mapping[Hashable, str],
                 answer_types: Mapping[Hashable, str] | None = None, *,
                 question_types: Mapping[Hashable, str] | None = None,
                 num_answers: int | None = 10,
                 lemmatize: Callable[[str], str] | None = None,
                 ndigits: int | None = 2,
                 per_question: bool = False,
                 rules: str = "lavis") -> dict[str, Any]:
    """Official VQAv2 (and OK-VQA) accuracy, in percent.

    Args:
      references: ``{question_id: [answer, ...]}`` — the raw human answers (10 per question for
        VQAv2 / OK-VQA), exactly as in the annotation file.
      predictions: ``{question_id: predicted answer}``; must have exactly the references' ids
        (the official ``loadRes`` asserts the same).
      answer_types: optional ``{question_id: "yes/no" | "number" | "other" | ...}`` → adds
        ``per_answer_type``; ``question_types`` likewise → ``per_question_type``. Extra ids in
        these maps are ignored; missing ones are an error.
      num_answers: every reference list must have exactly this many answers (default 10, as in
        VQAv2). ``None`` accepts any count ≥ 2; the leave-one-out formula then averages over
        ``n`` subsets of ``n-1`` answers, still with the fixed threshold 3 (so with ``n`` answers
        ``k`` ≥ 4 matches still give 1.0, but e.g. for ``n=3`` three matches give 2/3).
      lemmatize: optional ``str -> str`` applied to each raw prediction first. LAVIS does this for
        OK-VQA (spaCy ``en_core_web_sm`` lemmas of NOUN/VERB tokens, :func:`spacy_lemmatizer`).
      ndigits: rounding of the percentages (the official script uses 2); ``None`` for none.
      per_question: also return ``per_question`` = ``{question_id: accuracy in percent}``.
      rules: ``"lavis"`` (default; the official script as LAVIS vendors it) or ``"vqa-master"``
        (GT-Vision-Lab/VQA master since 2021); see :func:`vqa_score`.

    Returns:
      ``{"overall": float, "num_questions": int}`` plus ``per_answer_type`` /
      ``per_question_type`` / ``per_question`` when requested.
    """
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    if not references:
        raise MetricInputError("references are empty")
    _check_ids(references, predictions)
    _check_predictions(predictions)
    bad_type = [q for q, a in references.items()
                if isinstance(a, str) or not isinstance(a, Sequence)
                or not all(isinstance(x, str) for x in a)]
    if bad_type:
        raise MetricInputError(f"each reference must be a list of answer strings; not for question "
                               f"id(s) {_some(bad_type)} (e.g. {references[bad_type[0]]!r})")
    if num_answers is not None:
        bad = [q for q, a in references.items() if len(a) != num_answers]
        if bad:
            raise MetricInputError(
                f"{len(bad)} question(s) do not have exactly {num_answers} reference answers "
                f"(e.g. {_some(bad)} with {len(references[bad[0]])}); pass num_answers=None "
                "to score other counts with the same leave-one-out formula")
    else:
        bad = [q for q, a in references.items() if len(a) < 2]
        if bad:
            raise MetricInputError(
                f"question id(s) {_some(bad)} have fewer than 2 reference answers: the "
                "leave-one-out VQA formula would always score 0 (use exact_match instead)")

    scores: dict[Hashable, float] = {}
    for q, answers in references.items():
        pred = predictions[q]
        if lemmatize is not None:
            pred = lemmatize(pred)
        scores[q] = vqa_score(pred, answers, rules=rules)

    out: dict[str, Any] = {
        "overall": _round(100.0 * sum(scores.values()) / len(scores), ndigits),
        "num_questions": len(scores),
    }
    if answer_types is not None:
        out["per_answer_type"] = _group_means(scores, answer_types, "answer_types", ndigits)
    if question_types is not None:
        out["per_question_type"] = _group_means(scores, question_types, "question_types",
                                                ndigits)
    if per_question:
        out["per_question"] = {q: _round(100.0 * s, ndigits) for q, s in scores.items()}
    return out


def exact_match(references: Mapping[Hashable, str], predictions: Mapping[Hashable, str], *,
                normalize: bool = True,
                lemmatize: Callable[[str], str] | None = None,
                ndigits: int | None = None, per_question: bool = False) -> dict[str, Any]:
    """GQA accuracy as LAVIS computes it (``GQATask._report_metrics``), in percent.

    With generated answers (``inference_method="generate"``, always the case for BLIP-2) LAVIS
    applies ``processPunctuation`` then ``processDigitArticle`` to the *prediction* only (no
    newline/strip pre-step, no processing of the ground truth) and scores ``pred == gt_ans``.
    ``normalize=False`` compares the raw strings (LAVIS's ``rank`` inference). LAVIS does not
    round (``ndigits=None``).

    Returns ``{"accuracy": float, "num_questions": int}``, plus ``per_question`` =
    ``{question_id: 100.0 or 0.0}`` when asked.
    """
    if not references:
        raise MetricInputError("references are empty")
    _check_ids(references, predictions)
    _check_predictions(predictions)
    bad = [q for q, a in references.items() if not isinstance(a, str)]
    if bad:
        raise MetricInputError(f"each reference must be a single answer string; not for question "
                               f"id(s) {_some(bad)} (e.g. {references[bad[0]]!r})")
    hits: dict[Hashable, bool] = {}
    for q, gt in references.items():
        pred = predictions[q]
        if lemmatize is not None:
            pred = lemmatize(pred)
        if normalize:
            pred = process_digit_article(process_punctuation(pred))
        hits[q] = pred == gt
    out: dict[str, Any] = {"accuracy": _round(100.0 * sum(hits.values()) / len(references),
                                              ndigits),
                           "num_questions": len(references)}
    if per_question:
        out["per_question"] = {q: 100.0 * h for q, h in hits.items()}
    return out


def spacy_lemmatizer(model: str = "en_core_web_sm", nlp: Callable | None = None
                     ) -> Callable[[str], str]:
    """LAVIS's OK-VQA answer lemmatiser (``Blip2T5._lemmatize``) as a ``str -> str`` hook.

    Tokens tagged NOUN or VERB are replaced by their ``lemma_``, all others keep ``text``, and the
    tokens are joined with single spaces. Needs spaCy and its ``en_core_web_sm`` model, which are
    not dependencies of this package (``pip install spacy && python -m spacy download
    en_core_web_sm``); pass ``nlp`` to use an already loaded pipeline.
    """
    if nlp is None:
        try:
            # optional dependency: spaCy lemmatizes VQA answers only when it is installed
            import spacy
        except ImportError as e:
            raise ImportError("OK-VQA lemmatisation needs spaCy (not a dependency of blip2_jax): "
                              "pip install spacy && python -m spacy download "
                              f"{model}") from e
        nlp = spacy.load(model)

    def lemmatize(answer: str) -> str:
        return " ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(answer))

    return lemmatize
