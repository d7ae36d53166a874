"""The paper's evaluations (the paper §4, LAVIS's eval yamls) for `eval.py --checkpoint`.

    python eval.py --config configs/eval_blip2.py:coco_caption \\
        --checkpoint /ckpt/blip2-opt-2.7b-coco --config.data.data_dir=/data
    python eval.py --config configs/eval_blip2.py:vqav2,okvqa,gqa --checkpoint /ckpt/blip2-flan-t5-xl \\
        --config.data.data_dir=/data

Arg: one or more of coco_caption, nocaps, flickr_caption, vqav2, okvqa, gqa, coco_retrieval,
flickr_retrieval (comma-separated). The image size is the checkpoint's (364 px for the COCO fine-tuned models,
224 px for the pre-trained ones used zero-shot). Tokenizers come from the checkpoint directory
unless `--config.text.llm_tokenizer` / `--config.text.qformer_tokenizer` name others.

Datasets (build them with `python -m blip2_jax.data.build`; the names are what these evaluators
read from data_dir):
- blip2_captions/coco_karpathy, split test: LAVIS's coco_karpathy_test.json (one entry per image
  with its 5 captions) — `build retrieval --annotations test=coco_karpathy_test.json`;
- blip2_captions/nocaps, split val; blip2_captions/flickr30k, split test (flickr30k_test.json);
- blip2_vqa/vqav2, split val; blip2_vqa/okvqa, split test; blip2_vqa/gqa, split testdev
  (GQA test-dev balanced, one answer per question).
"""
from blip2_jax.train import defaults

EVALUATORS = defaults.PAPER_EVALUATORS


def get_config(arg=None):
    names = [n for n in (arg or "coco_caption").split(",") if n]
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"eval_blip2 takes evaluators from {sorted(EVALUATORS)}, got {unknown}")
    c = defaults.base_config()
    c.data = dict(data_dir="/path/to/tfds_data")      # set --config.data.data_dir
    c.text = dict(llm_tokenizer="", qformer_tokenizer="")
    c.eval.batch_size = 64
    c.eval.evaluators = {n: EVALUATORS[n] for n in names}
    return c
