"""Command line: score caption / VQA / GQA predictions; prints ONE JSON object on stdout.

    python -m blip2_jax.metrics caption --references R.json --predictions P.json \\
        [--no-meteor] [--tokenize python|java]
    python -m blip2_jax.metrics vqa --references R.json --predictions P.json \\
        [--answer-types T.json] [--num-answers 10|any] [--lemmatize]
        [--rules lavis|vqa-master]
    python -m blip2_jax.metrics gqa --references R.json --predictions P.json [--no-normalize]

Accepted files (ids are compared as strings, so ``1`` and ``"1"`` are the same id):

* caption references: ``{id: [ref, ...]}``; a COCO caption annotation file
  (``{"annotations": [{"image_id": .., "caption": ..}, ...]}``); or such a list of
  ``{"image_id", "caption"}`` records (LAVIS ``coco_karpathy_*_gt.json`` is the former).
* caption predictions: ``{id: caption}`` or ``[{"image_id": .., "caption": ..}, ...]`` (COCO
  results / LAVIS result files).
* vqa references: ``{question_id: [answer x10]}``; an official VQA annotation file
  (``{"annotations": [{"question_id", "answers": [{"answer": ..}, ..], "answer_type", ..}]}`` — its
  answer/question types are used unless ``--answer-types`` is given); or a list of
  ``{"question_id", "answer"|"answers": [..]}`` records (LAVIS ``vqav2``/``okvqa`` eval files).
* gqa references: ``{question_id: answer}`` or a list of ``{"question_id", "answer"|"gt_ans"}``
  records (so a LAVIS GQA result file serves as both references and predictions).
* vqa/gqa predictions: ``{question_id: answer}`` or ``[{"question_id", "answer"|"pred_ans"}, ...]``.

Exit status: 0 ok; 2 bad arguments or input files (one line `python -m blip2_jax.metrics: error:
...` on stderr; `--verbose`: with its traceback); 1 a missing optional dependency (e.g. Java or
spaCy).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from blip2_jax import cli
from blip2_jax.metrics import MetricInputError
from blip2_jax.metrics.caption import caption_metrics
from blip2_jax.metrics.vqa import exact_match, spacy_lemmatizer, vqa_accuracy

PROG = "python -m blip2_jax.metrics"


class InputError(ValueError):
    """Bad input files: reported as ``PROG: error: <message>`` with exit status 2."""


def _load(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} file {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} file {path}: is a directory") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} file {path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} file {path}: cannot be read ({e})") from None


def _records(data: Any, path: str, what: str, id_key: str,
             value_keys: tuple[str, ...]) -> list[tuple[str, Any]]:
    """``[(id, value), ...]`` from a list of dict records."""
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise InputError(f"{what} file {path}: entry {i} is {type(rec).__name__}, expected "
                             f"an object with {id_key!r}")
        if id_key not in rec:
            raise InputError(f"{what} file {path}: entry {i} has no {id_key!r} key "
                             f"(keys: {sorted(rec)[:6]})")
        key = next((k for k in value_keys if k in rec), None)
        if key is None:
            raise InputError(f"{what} file {path}: entry {i} has none of the keys "
                             f"{list(value_keys)} (keys: {sorted(rec)[:6]})")
        out.append((str(rec[id_key]), rec[key]))
    return out


def _unique(pairs: list[tuple[str, Any]], path: str, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out and out[k] != v:
            raise InputError(f"{what} file {path}: id {k} appears more than once with different "
                             "values")
        out[k] = v
    return out


def _check_str(d: dict, path: str, what: str, expect: str) -> None:
    for k, v in d.items():
        if not isinstance(v, str):
            raise InputError(f"{what} file {path}: the value for id {k} is "
                             f"{type(v).__name__} ({v!r:.60}), expected {expect}")


def _check_str_list(d: dict, path: str, what: str) -> None:
    for k, v in d.items():
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise InputError(f"{what} file {path}: the value for id {k} is {v!r:.60}, expected a "
                             "list of strings")


def _nonempty(d: dict, path: str, what: str) -> dict:
    if not d:
        raise InputError(f"{what} file {path}: contains no entries")
    return d


def _shape_error(path: str, what: str, expect: str, data: Any) -> InputError:
    return InputError(f"{what} file {path}: expected {expect}, got a JSON "
                      f"{type(data).__name__}")


# --- loaders ----------------------------------------------------------------------------------
def load_predictions(path: str, id_key: str, value_keys: tuple[str, ...]) -> dict[str, str]:
    data = _load(path, "predictions")
    expect = f"an object {{id: answer}} or a list of {{{id_key!r}, {value_keys[0]!r}}} records"
    if isinstance(data, dict):
        preds = {str(k): v for k, v in data.items()}
    elif isinstance(data, list):
        preds = _unique(_records(data, path, "predictions", id_key, value_keys), path,
                        "predictions")
    else:
        raise _shape_error(path, "predictions", expect, data)
    _check_str(preds, path, "predictions", "a string")
    return _nonempty(preds, path, "predictions")


def load_caption_references(path: str) -> dict[str, list[str]]:
    data = _load(path, "references")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if isinstance(data, dict):
        refs = {str(k): ([v] if isinstance(v, str) else v) for k, v in data.items()}
    elif isinstance(data, list):
        refs: dict[str, list] = {}
        for k, v in _records(data, path, "references", "image_id", ("caption",)):
            refs.setdefault(k, []).append(v)
    else:
        raise _shape_error(path, "references", "an object {id: [caption, ...]} or COCO "
                           "caption annotations", data)
    _check_str_list(refs, path, "references")
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise InputError(f"references file {path}: id {empty[0]} has no reference captions")
    return _nonempty(refs, path, "references")


def _answer_list(v: Any) -> Any:
    # official annotation style [{"answer": .., "answer_id": ..}, ...] -> [str, ...]
    if isinstance(v, list) and all(isinstance(x, dict) and "answer" in x for x in v):
        return [x["answer"] for x in v]
    return v


def load_vqa_references(path: str) -> tuple[dict[str, list[str]], dict[str, str] | None,
                                            dict[str, str] | None]:
    """-> (references, answer_types or None, question_types or None)."""
    data = _load(path, "references")
    ans_types = q_types = None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        anns = data["annotations"]
        pairs = _records(anns, path, "references", "question_id", ("answers", "answer"))
        refs = _unique([(k, _answer_list(v)) for k, v in pairs], path, "references")
        if all("answer_type" in a for a in anns):
            ans_types = {str(a["question_id"]): str(a["answer_type"]) for a in anns}
        if all("question_type" in a for a in anns):
            q_types = {str(a["question_id"]): str(a["question_type"]) for a in anns}
    elif isinstance(data, dict):
        refs = {str(k): v for k, v in data.items()}
    elif isinstance(data, list):
        pairs = _records(data, path, "references", "question_id", ("answers", "answer"))
        refs = _unique([(k, _answer_list(v)) for k, v in pairs], path, "references")
    else:
        raise _shape_error(path, "references", "an object {question_id: [answers]} or VQA "
                           "annotations", data)
    _check_str_list(refs, path, "references")
    return _nonempty(refs, path, "references"), ans_types, q_types


def load_gqa_references(path: str) -> dict[str, str]:
    data = _load(path, "references")
    if isinstance(data, dict):
        refs = {str(k): v for k, v in data.items()}
    elif isinstance(data, list):
        refs = _unique(_records(data, path, "references", "question_id", ("answer", "gt_ans")),
                       path, "references")
    else:
        raise _shape_error(path, "references", "an object {question_id: answer}", data)
    _check_str(refs, path, "references", "a single answer string")
    return _nonempty(refs, path, "references")


def load_types(path: str) -> dict[str, str]:
    data = _load(path, "answer-types")
    if not isinstance(data, dict):
        raise _shape_error(path, "answer-types", "an object {question_id: answer_type}", data)
    types = {str(k): v for k, v in data.items()}
    _check_str(types, path, "answer-types", "a string")
    return types


# --- subcommands ------------------------------------------------------------------------------
def _cmd_caption(args: argparse.Namespace) -> dict:
    refs = load_caption_references(args.references)
    preds = load_predictions(args.predictions, "image_id", ("caption",))
    try:
        return caption_metrics(refs, preds, tokenize=args.tokenize, meteor=args.meteor)
    except (RuntimeError, OSError) as e:  # e.g. Java missing for tokenize="java" / METEOR
        raise _Unavailable(f"caption metrics failed: {e}") from None


def _lemmatizer(args: argparse.Namespace):
    if not args.lemmatize:
        return None
    try:
        return spacy_lemmatizer()
    except (ImportError, OSError) as e:   # OSError: spaCy installed but the model is not
        raise _Unavailable(str(e)) from None


def _cmd_vqa(args: argparse.Namespace) -> dict:
    refs, ans_types, q_types = load_vqa_references(args.references)
    preds = load_predictions(args.predictions, "question_id", ("answer", "pred_ans"))
    if args.answer_types:
        ans_types = load_types(args.answer_types)
    return vqa_accuracy(refs, preds, ans_types, question_types=q_types,
                        num_answers=args.num_answers, lemmatize=_lemmatizer(args),
                        rules=args.rules)


def _cmd_gqa(args: argparse.Namespace) -> dict:
    refs = load_gqa_references(args.references)
    preds = load_predictions(args.predictions, "question_id", ("answer", "pred_ans"))
    return exact_match(refs, preds, normalize=args.normalize,
                       lemmatize=_lemmatizer(args))


class _Unavailable(Exception):
    """A missing optional dependency: exit status 1."""


def _num_answers(s: str) -> int | None:
    if s == "any":
        return None
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'any', got {s!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError("must be at least 2 (the leave-one-out formula scores "
                                         "0 with a single answer)")
    return n


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description="Score predictions; prints one JSON object.")
    sub = p.add_subparsers(dest="task", required=True, metavar="{caption,vqa,gqa}")

    c = sub.add_parser("caption", help="COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr)")
    c.add_argument("--references", required=True, metavar="R.json")
    c.add_argument("--predictions", required=True, metavar="P.json")
    c.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=True,
                   help="METEOR (needs Java; default: on)")
    c.add_argument("--tokenize", choices=("python", "java"), default="python",
                   help="PTB tokenizer: pure-Python re-implementation or the Java original")
    c.set_defaults(func=_cmd_caption)

    v = sub.add_parser("vqa", help="official VQAv2 / OK-VQA accuracy (percent)")
    v.add_argument("--references", required=True, metavar="R.json")
    v.add_argument("--predictions", required=True, metavar="P.json")
    v.add_argument("--answer-types", metavar="T.json",
                   help="{question_id: answer_type} for the per-answer-type breakdown")
    v.add_argument("--num-answers", type=_num_answers, default=10, metavar="N|any",
                   help="required number of answers per question (default 10)")
    v.add_argument("--lemmatize", action="store_true",
                   help="lemmatise predictions with spaCy en_core_web_sm (LAVIS OK-VQA)")
    v.add_argument("--rules", choices=("lavis", "vqa-master"), default="lavis",
                   help="version of the official vqaEval.py normalisation (default: lavis)")
    v.set_defaults(func=_cmd_vqa)

    g = sub.add_parser("gqa", help="GQA exact match after VQA normalisation (percent)")
    g.add_argument("--references", required=True, metavar="R.json")
    g.add_argument("--predictions", required=True, metavar="P.json")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="VQA answer normalisation before comparing (default: on; --no-normalize "
                        "compares raw strings, as LAVIS 'rank' inference)")
    g.add_argument("--lemmatize", action="store_true", help=argparse.SUPPRESS)
    g.set_defaults(func=_cmd_gqa)
    for sub_parser in (c, v, g):
        cli.add_verbose_argument(sub_parser)
    return p


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):          # numpy scalars / arrays
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _score(args: argparse.Namespace) -> dict:
    try:
        return args.func(args)
    except MetricInputError as e:     # the files load but do not line up (ids, answer counts)
        raise InputError(f"{args.references} / {args.predictions}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = {}
    try:
        code = cli.report_errors(PROG, lambda: result.update(_score(args)), (InputError,),
                                 args.verbose)
    except _Unavailable as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if code == 0:
        print(json.dumps(result, default=_jsonable))
    return code


if __name__ == "__main__":
    sys.exit(main())
