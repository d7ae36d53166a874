"""Build a dataset: `python -m blip2_jax.data.build KIND ... --data-dir DIR`.

    build synthetic  --data-dir DIR [--name synthetic] [--train 5000 --val 500 --test 500 --seed 0]
                     (also writes small tokenizers of its language to DIR/tokenizers/NAME/)
    build captions   --annotations [SPLIT=]FILE.json ... --image-root DIR --data-dir DIR [--name N]
    build retrieval  --annotations [SPLIT=]FILE.json ... --image-root DIR --data-dir DIR [--name N]
    build vqa        --annotations [SPLIT=]FILE.json ... --image-root DIR --data-dir DIR [--name N]
    build webdataset --shards 'PATTERN' [--split train] --data-dir DIR --name N
    build tokenizers --data-dir DIR --name N [--split train]
                     small tokenizers (qformer / opt / t5 / llama) fitted to the text of a built
                     dataset's split — blip2_captions/N's captions, and blip2_vqa/N's questions
                     in the prompt "Question: {} Answer:" and answers where it exists — in
                     DIR/tokenizers/N/, as `build synthetic` writes them: for toy models
                     trained from scratch on your own data (`python -m blip2_jax.demo
                     --annotations ...` builds them itself)

An annotation file without `SPLIT=` is the "train" split ("test" for retrieval). Shard patterns
take globs and webdataset brace ranges (`shards/{00000..00099}.tar`). Prints what it wrote per
split (examples, skipped records with the first few keys and reasons). Bad input (a malformed
annotation file, a missing file or directory, a dataset that exists without --overwrite) is one
line `python -m blip2_jax.data.build: error: ...` naming the file and entry, exit status 2
(`--verbose`: with its traceback).
"""
from __future__ import annotations

import glob
import itertools
import os
import re
import sys

import absl.logging

from blip2_jax import cli
from blip2_jax.data import builders, records, synthetic

_BRACE = re.compile(r"\{([^{}]*)\}")
PROG = "python -m blip2_jax.data.build"
# Bad input, reported in one line (cli.report_errors); anything else is a bug.
USER_ERRORS = (records.AnnotationError, builders.DatasetError, builders.EmptySplitError,
               FileExistsError, FileNotFoundError)


def expand_shards(pattern: str) -> list[str]:
    """Brace ranges `{000..099}` and lists `{a,b}` (webdataset's braceexpand), then globs."""
    m = _BRACE.search(pattern)
    if m:
        body = m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.groups()
            width = len(lo)
            options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            options = body.split(",")
        return list(itertools.chain.from_iterable(
            expand_shards(pattern[:m.start()] + o + pattern[m.end():]) for o in options))
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern]


def tokenizer_dir(data_dir: str, name: str = "synthetic") -> str:
    """Where `build synthetic` and `build tokenizers` write a dataset's small tokenizers."""
    return os.path.join(data_dir, "tokenizers", name)


def dataset_texts(data_dir: str, name: str, split: str = "train") -> list[str]:
    """The text of a built dataset's split: the captions of blip2_captions/NAME, and the
    questions in the VQA prompt and the answers of blip2_vqa/NAME, those that exist."""
    return [t for texts in builders.image_texts(data_dir, name, split).values()
            for t in texts["captions"] + [x for q, answers in texts["qa"]
                                          for x in [synthetic.VQA_PROMPT.format(q), *answers]]]


def annotation_splits(items: list[str], default_split: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep:
            split, path = default_split, item
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise records.AnnotationError(f"--annotations {item!r}: split name {split!r} must "
                                          "be letters, digits and '_'")
        if split in out:
            raise records.AnnotationError(f"--annotations: split {split!r} given twice")
        out[split] = path
    return out


def _stem(path: str) -> str:
    stem = os.path.basename(path).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "dataset"


def _print_reports(kind: str, name: str, data_dir: str, reports) -> None:
    print(f"wrote {kind}/{name} to {builders.dataset_path(data_dir, f'{kind}/{name}')}")
    for split, r in reports.items():
        print(f"  {split}: {r.examples} examples, {r.skipped} skipped")
        for s in r.first_skipped:
            print(f"    skipped {s['key']}: {s['reason']}")
        if r.skipped > len(r.first_skipped):
            print(f"    ... and {r.skipped - len(r.first_skipped)} more")


def _quiet_tfds() -> None:
    # Our report replaces tfds's progress bars and its "custom configuration" warnings.
    # start-up time: tfds takes seconds to import; only building or reading a dataset needs it
    import tensorflow_datasets as tfds
    absl.logging.set_verbosity(absl.logging.ERROR)
    tfds.disable_progress_bar()


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)

    def common(p, named=True):
        cli.add_verbose_argument(p)
        p.add_argument("--data-dir", required=True, help="tfds data directory to write into")
        if named:
            p.add_argument("--name", help="dataset name (default: from the first input file)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
        p.add_argument("--workers", type=int, default=8, help="image-reading threads")
        p.add_argument("--max-image-size", type=int, default=None,
                       help="shrink images longer than this on a side (re-encoded)")

    p = sub.add_parser("synthetic", help="the built-in procedural dataset")
    common(p, named=False)
    p.add_argument("--name", default="synthetic")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=3)
    for kind in ("captions", "retrieval", "vqa"):
        p = sub.add_parser(kind, help=f"{kind} annotations in the LAVIS JSON form")
        common(p)
        p.add_argument("--annotations", nargs="+", required=True, metavar="[SPLIT=]FILE")
        p.add_argument("--image-root", required=True)
    p = sub.add_parser("tokenizers", help="small tokenizers fitted to a built dataset's text")
    cli.add_verbose_argument(p)
    p.add_argument("--data-dir", required=True, help="tfds data directory holding the dataset")
    p.add_argument("--name", required=True, help="the dataset's NAME (blip2_captions/NAME)")
    p.add_argument("--split", default="train", help="the split whose text they are fitted to")
    p = sub.add_parser("webdataset", help="webdataset .tar shards (image + .txt/.json)")
    common(p)
    p.add_argument("--shards", required=True, nargs="+", metavar="PATTERN")
    p.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    if args.kind == "synthetic" and not 1 <= args.min_objects <= args.max_objects <= 9:
        parser.error(f"need 1 <= --min-objects <= --max-objects <= 9, got {args.min_objects} "
                     f"and {args.max_objects}")
    _quiet_tfds()
    return cli.report_errors(PROG, lambda: build(args), USER_ERRORS, args.verbose)


def build(args) -> None:
    """The dataset `main`'s arguments ask for, written and reported."""
    if args.kind == "synthetic":
        sizes = {"train": args.train, "val": args.val, "test": args.test}
        opts = dict(seed=args.seed, image_size=args.image_size,
                    min_objects=args.min_objects, max_objects=args.max_objects)
        # Rendered once, written in both schemas.
        scenes = {s: list(synthetic.generate(s, n, **opts)) for s, n in sizes.items() if n}
        for kind in builders.KINDS:
            splits = {s: (lambda s=s, kind=kind: builders.synthetic_examples(kind, scenes[s]))
                      for s in scenes}
            reports = builders.build(kind, args.name, args.data_dir, splits,
                                     description=f"synthetic scenes {opts}",
                                     overwrite=args.overwrite)
            _print_reports(kind, args.name, args.data_dir, reports)
        texts = [t for ex in scenes.get("train", next(iter(scenes.values())))
                 for t in ex["captions"] + [x for q, a in ex["qa"]
                                            for x in (synthetic.VQA_PROMPT.format(q), a)]]
        dirs = synthetic.write_tokenizers(texts, tokenizer_dir(args.data_dir, args.name))
        print(f"wrote tokenizers for the synthetic language: {', '.join(dirs.values())}")
        return
    if args.kind == "tokenizers":
        texts = dataset_texts(args.data_dir, args.name, args.split)
        dirs = synthetic.write_tokenizers(texts, tokenizer_dir(args.data_dir, args.name),
                                          qformer_vocab=None, opt_vocab=512, llama_vocab=512,
                                          t5_vocab=None)
        print(f"wrote tokenizers fitted to {len(texts)} texts of {args.name}'s {args.split} "
              f"split: {', '.join(dirs.values())}")
        return

    read = dict(workers=args.workers, max_size=args.max_image_size)
    if args.kind == "webdataset":
        shards = [s for pattern in args.shards for s in expand_shards(pattern)]
        missing = [s for s in shards if not os.path.isfile(s)]
        if not shards or missing:
            raise records.AnnotationError(f"--shards {args.shards}: no such shard file(s) "
                                          f"{missing[:5] or '(pattern matched nothing)'}")
        name = args.name or _stem(shards[0])
        splits = {args.split: lambda: builders.webdataset_examples(shards, **read)}
        kind = builders.CAPTIONS
    else:
        files = annotation_splits(args.annotations,
                                   "test" if args.kind == "retrieval" else "train")
        if not os.path.isdir(args.image_root):
            raise records.AnnotationError(f"--image-root {args.image_root}: no such directory")
        name = args.name or _stem(next(iter(files.values())))
        # Parse and validate every file before writing anything.
        parse = {"captions": records.caption_entries, "retrieval": records.retrieval_entries,
                 "vqa": records.vqa_entries}[args.kind]
        entries = {split: parse(path) for split, path in files.items()}
        splits = {split: (lambda e=e: builders.entry_examples(e, args.image_root, **read))
                  for split, e in entries.items()}
        kind = builders.VQA if args.kind == "vqa" else builders.CAPTIONS
    reports = builders.build(kind, name, args.data_dir, splits,
                             description=f"{args.kind} built by blip2_jax.data.build",
                             overwrite=args.overwrite)
    _print_reports(kind, name, args.data_dir, reports)


if __name__ == "__main__":
    sys.exit(main())
