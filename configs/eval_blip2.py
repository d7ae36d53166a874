"""The paper's evaluations (blip2.md §5, LAVIS's eval yamls) for `eval.py --checkpoint`.

    python eval.py --config configs/eval_blip2.py:coco_caption \\
        --checkpoint /ckpt/blip2-opt-2.7b-coco --config.data.data_dir=/data
    python eval.py --config configs/eval_blip2.py:vqav2,okvqa,gqa --checkpoint /ckpt/blip2-flan-t5-xl \\
        --config.data.data_dir=/data

Arg: one or more of coco_caption, nocaps, vqav2, okvqa, gqa, coco_retrieval, flickr_retrieval
(comma-separated). The image size is the checkpoint's (364 px for the COCO fine-tuned models,
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

VQA_PROMPT = "Question: {} Short answer:"     # §3.3: LAVIS's zero-shot VQA prompt (OPT and T5)
EVALUATORS = {
    # §5.2: beam 5, 8-30 tokens, "a photo of" (LAVIS@release passed only these).
    "coco_caption": dict(kind="caption", dataset="blip2_captions/coco_karpathy", split="test",
                         prompt="a photo of", num_beams=5, min_new_tokens=8,
                         max_new_tokens=30),
    # §5.2: LAVIS's NoCaps yaml (beam 5, 10-80 tokens, length penalty 1).
    "nocaps": dict(kind="caption", dataset="blip2_captions/nocaps", split="val",
                   prompt="a photo of", num_beams=5, min_new_tokens=10, max_new_tokens=80,
                   length_penalty=1.0),
    # §5.1: beam 5, ≤ 10 tokens, at least 1, length penalty -1 (the paper; LAVIS's OPT path
    # uses 0: set --config.eval.evaluators.vqav2.length_penalty=0 to follow it).
    "vqav2": dict(kind="vqa", dataset="blip2_vqa/vqav2", split="val", template=VQA_PROMPT,
                  num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0),
    "okvqa": dict(kind="vqa", dataset="blip2_vqa/okvqa", split="test", template=VQA_PROMPT,
                  num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0,
                  lemmatize=True),            # LAVIS apply_lemmatizer (spaCy en_core_web_sm)
    "gqa": dict(kind="vqa", dataset="blip2_vqa/gqa", split="testdev", template=VQA_PROMPT,
                num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0,
                metric="gqa"),
    # §5.3: k_test 128, text max_length 35.
    "coco_retrieval": dict(kind="retrieval", dataset="blip2_captions/coco_karpathy",
                           split="test", k=128, max_length=35),
    # Zero-shot Flickr uses the COCO-finetuned retrieval model (§5.3).
    "flickr_retrieval": dict(kind="retrieval", dataset="blip2_captions/flickr30k", split="test",
                             k=128, max_length=35),
}


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
