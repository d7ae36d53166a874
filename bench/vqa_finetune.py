"""VQA fine-tuning at toy scale: held-out VQA accuracy of the demo's stage-2 model (zero-shot)
against the same model after the VQA fine-tune (answer generation, question-aware Q-Former).

    python -m blip2_jax.demo --work out/demo                # the recipe up to stage 2 (~10 min)
    python bench/vqa_finetune.py --work out/demo [--steps 1000] [--lr 1e-4]

The fine-tune is configs/demo.py:stage2's model and training set-up (frozen ViT through the
feature cache, frozen pre-trained OPT, batch 32) with configs/vqa_ft.py's changes: the Q-Former
made question-aware (its text side from WORK/stage1/final, the rest from WORK/stage2/final), the
synthetic VQA training split (one answer per question drawn by frequency), the answer loss. The
prompt is the bare question (the synthetic tokenizers know no "Question:"). Both models are
scored by the same VQA evaluator (beam 3) on the test split's questions: the official VQA
accuracy (LAVIS's rules), also with the 2021 rules and per question kind by exact match.

Printed: one JSON object; the runs go to WORK/vqa_s{steps}_lr{lr}/.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT]

KINDS = (("how many", "count"), ("what color", "color"), ("what shape", "shape"),
         ("small or large", "size"), ("where", "where"), ("is there", "exists"))


def _kind(question: str) -> str:
    return next(k for prefix, k in KINDS if prefix in question)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="out/demo", help="the demo's work directory")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()

    import blip2_jax
    from blip2_jax import run_config
    from blip2_jax.eval import runner
    from blip2_jax.metrics import vqa
    from blip2_jax.train import defaults, loop

    w = args.work
    out = os.path.join(w, f"vqa_s{args.steps}_lr{args.lr:g}")
    c = run_config.load(f"{os.path.join(_ROOT, 'configs', 'demo.py')}:stage2,{w}")
    overrides = run_config.plain(c.model_overrides)
    overrides["qformer"] = dict(overrides["qformer"], has_text_input=True)
    overrides["qformer_text_input"] = True
    c.model_overrides = overrides
    c.init = dict(checkpoint=f"{w}/stage2/final", qformer_text=f"{w}/stage1/final", random=())
    c.data.train = dict(name="blip2_vqa/synthetic", split="train")
    c.data.question_template = "{}"
    c.text = dict(llm_tokenizer="{data_dir}/tokenizers/synthetic/opt",
                  qformer_tokenizer="{data_dir}/tokenizers/synthetic/qformer", max_length=48)
    c.eval.evaluators = defaults.synthetic_evaluators("vqa", num_beams=3)
    c.eval.every_steps = max(args.steps // 4, 1)
    c.total_steps = args.steps
    c.optimizer.lr = args.lr
    c.optimizer.warmup_steps = min(int(c.optimizer.warmup_steps), args.steps // 2)
    t = time.perf_counter()
    loop.run(c, out)
    result = {"fine_tune_seconds": round(time.perf_counter() - t),
              "steps": args.steps, "lr": args.lr, "batch": int(c.batch_size)}
    evs, tokenizers = run_config.evaluators(c)
    mesh = run_config.make_mesh(c)
    for name, path in (("zero_shot_stage2", f"{w}/stage2/final"),
                       ("vqa_fine_tuned", f"{out}/final")):
        model = blip2_jax.load(path, dtype=None)
        r = runner.run(model, evs, mesh=mesh, tokenizers=tokenizers,
                       out_dir=os.path.join(out, f"eval_{name}"), report=False, progress=False)[0]
        refs = {p["question_id"]: p["answers"] for p in r.predictions}
        preds = {p["question_id"]: p["prediction"] for p in r.predictions}
        by_kind = collections.defaultdict(list)
        for p in r.predictions:
            by_kind[_kind(p["question"])].append(p["prediction"].strip() == p["answers"][0])
        result[name] = {
            "vqa_accuracy": r.metrics["overall"],
            "vqa_accuracy_2021_rules": vqa.vqa_accuracy(refs, preds,
                                                        rules="vqa-master")["overall"],
            "questions": r.metrics["questions"],
            "exact_match_by_kind": {k: round(100 * sum(v) / len(v), 1)
                                    for k, v in sorted(by_kind.items())}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
