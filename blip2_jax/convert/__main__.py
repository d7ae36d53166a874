"""Convert BLIP-2 checkpoints between our format, Hugging Face and LAVIS, one tensor at a time.

    python -m blip2_jax.convert SRC DST --to hf|lavis|native [--from native|hf|lavis]
        [--config NAME|config.json|blip2_jax.json|DIR] [--dtype bf16|fp16|fp32]
        [--vision eva_vit_g.pth|clip_vit_L.pth|DIR] [--llm HF_OPT_OR_T5_DIR|DIR]
        [--lavis-parts full|trainable] [--ln-vision-eps EPS] [--max-shard-gb N]

SRC: a directory of ours (`blip2_jax.json`) or of HF (`config.json`), or a LAVIS `.pth` (its
model is inferred from its shapes unless --config names it). LAVIS releases only trainable
weights: add the towers with --vision and --llm. DST: a directory (hf, native) or a `.pth` file.
Bad input (a missing file, a checkpoint of another model or format, an unknown preset) ends with
one line `python -m blip2_jax.convert: error: ...` and exit status 2 (`--verbose`: with its
traceback).
"""
from __future__ import annotations

import json
import sys
import time

from blip2_jax import cli
from blip2_jax.convert import sources

PROG = "python -m blip2_jax.convert"


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--to", required=True, choices=("hf", "lavis", "native"))
    parser.add_argument("--from", dest="source_format", choices=("hf", "lavis", "native"))
    parser.add_argument("--config", help="preset name, config.json / blip2_jax.json or a dir")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="cast floating tensors (default: keep each tensor's dtype)")
    parser.add_argument("--vision", help="image-encoder source (EVA / CLIP .pth, or a model)")
    parser.add_argument("--llm", help="language-model source (HF OPT / T5 dir, or a model)")
    parser.add_argument("--lavis-parts", default="full", choices=("full", "trainable"),
                        help="--to lavis: every key (strict=True loads it) or the trainable ones")
    parser.add_argument("--ln-vision-eps", type=float,
                        help="ln_vision LayerNorm eps (LAVIS sources default to LAVIS's 1e-5)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    cli.add_verbose_argument(parser)
    args = parser.parse_args(argv)
    return cli.report_errors(PROG, lambda: convert(args), sources.CHECKPOINT_ERRORS,
                             args.verbose)


def convert(args) -> None:
    start = time.perf_counter()
    report = sources.convert(args.src, args.dst, args.to, source_format=args.source_format,
                             config=args.config, vision=args.vision, llm=args.llm,
                             dtype=args.dtype, parts=args.lavis_parts,
                             ln_vision_eps=args.ln_vision_eps,
                             max_shard_bytes=int(args.max_shard_gb * 1024**3))
    cfg = report.pop("config")
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["model"] = {"vision": cfg.vision.variant, "llm": cfg.llm_kind,
                       "heads": [h for h in ("itc", "itm", "itg") if getattr(cfg, h)]}
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
