"""Caption images, or answer a question about them, from the command line.

    python -m blip2_jax.predict --checkpoint DIR --image a.jpg [--image b.png ...]
        [--prompt "a photo of" | --question "what is the man holding?" [--template T]]
        [--num-beams N] [--max-new-tokens N] [--dtype float32|bfloat16]

Prints one line per image, in order: `PATH<TAB>text`. Without --question it captions
(`Blip2.caption`, LAVIS captioning defaults: 5 beams, 30 new tokens); with --question it answers
(`Blip2.answer`, LAVIS VQA defaults: template "Question: {} Short answer:", 5 beams, 10 new
tokens, length penalty -1). DIR is an HF `save_pretrained` BLIP-2 directory (OPT or FlanT5) with
its tokenizer files, or a native blip2-jax directory holding them.

Bad input (missing checkpoint or tokenizer files, an unreadable image, a checkpoint without a
language model, a template without `{}`) prints one line `python -m blip2_jax.predict: error: ...`
naming the file to stderr and exits with status 2 (`--verbose`: with its traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from PIL import Image, UnidentifiedImageError

import blip2_jax
from blip2_jax import cli, processing
from blip2_jax.convert import sources

PROG = "python -m blip2_jax.predict"


class PredictError(ValueError):
    """A checkpoint directory or image file that is not there or cannot serve."""


# Bad input, reported in one line (cli.report_errors); anything else is a bug.
USER_ERRORS = (PredictError, processing.TokenizerError, *sources.CHECKPOINT_ERRORS)


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG,
                           description="BLIP-2 captioning / zero-shot VQA on image files.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="HF save_pretrained BLIP-2 directory (or a native blip2-jax one)")
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="an image file (repeat for several)")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--prompt", default="", metavar="TEXT",
                      help="caption prompt the text continues (default: none)")
    task.add_argument("--question", metavar="TEXT", help="answer this question for every image")
    p.add_argument("--template", default=None, metavar="T",
                   help='VQA prompt template with {} for the question (default "Question: {} '
                        'Short answer:")')
    p.add_argument("--num-beams", type=int, default=None, metavar="N")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    cli.add_verbose_argument(p)
    return p


def _check_images(paths: Sequence[str]) -> None:
    """Fail before loading the model if an image file is missing or not an image."""

    for path in paths:
        if not os.path.isfile(path):
            raise PredictError(f"image {path}: no such file")
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise PredictError(f"image {path}: cannot be read as an image "
                               f"({type(e).__name__}: {e})") from e


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    if not os.path.isdir(args.checkpoint):
        raise PredictError(f"checkpoint directory {args.checkpoint} does not exist")
    _check_images(args.image)
    model = blip2_jax.load(args.checkpoint, dtype=args.dtype)
    if model.config.llm is None:
        raise PredictError(f"checkpoint {args.checkpoint} has no language model (a stage-1 / retrieval "
                     "checkpoint): it cannot caption or answer")
    kw = {}
    if args.num_beams is not None:
        kw["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        kw["max_new_tokens"] = args.max_new_tokens
    _ = model.tokenizer          # load it now: missing tokenizer files fail before any compute
    if args.question is not None:
        if args.template is not None:
            kw["template"] = args.template
        texts = model.answer(args.image, args.question, **kw)
    else:
        texts = model.caption(args.image, args.prompt, **kw)
    return list(zip(args.image, texts))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.template is not None and args.question is None:
        _parser().error("--template needs --question")
    if args.template:
        try:
            processing.fill_template(args.template, "")
        except ValueError as e:
            _parser().error(f"--template: {e}")
    for name in ("num_beams", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1")

    rows = []
    try:
        code = cli.report_errors(PROG, lambda: rows.extend(run(args)), USER_ERRORS,
                                 args.verbose)
    except KeyboardInterrupt:
        return 130
    for path, text in rows:
        print(f"{path}\t{' '.join(text.split())}")
    return code


if __name__ == "__main__":
    sys.exit(main())
