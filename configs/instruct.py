"""InstructBLIP instruction tuning (Dai et al. 2023, §2 and Appendix; LAVIS released no training
config): the BLIP-2 Q-Former made instruction-aware and tuned on captioning and VQA datasets
rendered as instructions.

    python train.py --config configs/instruct.py:flant5-xl --workdir /runs/instruct_flant5-xl \\
        --config.data.data_dir=/data/tfds \\
        --config.init.checkpoint=/runs/stage2_flant5-xl/final \\
        --config.init.qformer_text=/runs/stage1_vit_g/final \\
        --config.text.llm_tokenizer=/models/blip2-flan-t5-xl \\
        --config.text.qformer_tokenizer=/models/bert-base-uncased

Arg: the LLM, `vicuna-7b`, `vicuna-13b`, `flant5-xl` (default) or `flant5-xxl` (the paper's four);
a last `,POD` picks mesh / remat / microbatches from `defaults.POD_SETTINGS` (v5p-128 and
v5p-64: data parallel, memory compiled; README "Pods"). Every "/path/to/..." below is a placeholder: set it with
`--config.KEY=...` as above.

- Model: the InstructBLIP architecture (`instructblip-*` presets: the Q-Former keeps its text
  tables and text FFN, and reads the instruction beside its queries: `qformer_text_input`), 224
  px. Only the Q-Former, the query tokens and the projection to the LLM are trained (188M
  parameters); the ViT-g and the LLM stay frozen in bf16 with no optimizer state. Every tower
  computes in bf16 (the paper trains under autocast), trained parameters stay float32.
- Initialisation: `init.checkpoint`, a BLIP-2 stage-2 model with the same LLM (a `stage2.py`
  run's `final/` or the released `Salesforce/blip2-flan-t5-*`; for Vicuna the authors first ran
  BLIP-2's stage 2 with Vicuna, LAVIS issue #292). A stage-2 model has no Q-Former text side
  (LAVIS deletes it), so `init.qformer_text` takes it from the stage-1 model.
- Data (the held-in datasets this repository's builders read, placeholders to build with
  `python -m blip2_jax.data.build captions|vqa ...`): COCO Caption (Karpathy train), Web
  CapFilt (BLIP's 14M synthetic captions), TextCaps (captions; without the OCR tokens the paper
  appends to the instruction), VQAv2, OK-VQA, A-OKVQA and OCR-VQA. Not here: LLaVA-Instruct-150K
  (free-form instructions, no template) and the image question generation task (its templates
  need the answer filled in). Sampling: each dataset ∝ √(its records) (the paper's balanced
  sampling; its manual tweaks, A-OKVQA down and OK-VQA up, are unpublished: set a source's
  `weight`, on the scale of √records, to apply your own).
- Instructions: per example one template of its task (Table 5: 13 captioning, 10 VQA templates;
  the `<Image>` there is where the query tokens go, before the text) drawn from (seed, the
  example's position); the filled instruction is the LLM's prompt and the Q-Former's text, the
  caption or one answer (drawn by frequency) the response, its LM loss the loss (the response
  and END only; FlanT5: encoder the instruction, decoder the response).
- Steps: at most 60K (paper §2.6) at batch 192 (FlanT5-XL), 128 (Vicuna-7B), 64 (FlanT5-XXL,
  Vicuna-13B); AdamW (0.9, 0.999), weight decay 0.05; linear warm-up from 1e-8 to 1e-5 over
  1,000 steps, then cosine decay to 0. Validation every 3K steps.
- Text: 128 tokens (LAVIS's `max_txt_len`) for the Q-Former's instruction and the LLM row. The
  decoder-only row holds the instruction and the response in those 128 (LAVIS: 128 + up to 256
  for the response, which matters for long responses only: captions and VQA answers are short).
- Evaluation (held-out tasks, zero-shot, LAVIS's InstructBLIP eval settings): NoCaps and
  Flickr30K captioning (prompt "A short image caption:", beam 5, 10-80 tokens, repetition
  penalty 1.15: CIDEr), GQA (exact match), VizWiz and TextVQA (VQA accuracy) with the prompt
  "Question: {} Short answer:" (beam 5, at most 10 tokens, length penalty -1, repetition penalty
  1.5), every 3K steps.
"""
from blip2_jax.train import defaults

LLMS = {
    # arg: (preset, BLIP-2 checkpoint name (its LLM tokenizer), batch (paper §2.6))
    "vicuna-7b": ("instructblip-vicuna-7b", "vicuna-7b-v1.1", 128),
    "vicuna-13b": ("instructblip-vicuna-13b", "vicuna-13b-v1.1", 64),
    "flant5-xl": ("instructblip-flan-t5-xl", "blip2-flan-t5-xl", 192),
    "flant5-xxl": ("instructblip-flan-t5-xxl", "blip2-flan-t5-xxl", 64),
}
# Table 5 (the `<Image>` prefix dropped: the query tokens precede every prompt).
CAPTION_TEMPLATES = (
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
VQA_TEMPLATES = (
    "{}",
    "Question: {}",
    "{} A short answer to the question is",
    "Q: {} A:",
    "Question: {} Short answer:",
    "Given the image, answer the following question with no more than three words. {}",
    "Based on the image, respond to this question with a short answer: {}. Answer:",
    "Use the provided image to answer the question: {} Provide your answer as short as "
    "possible:",
    'What is the answer to the following question? "{}"',
    'The question "{}" can be answered using the image. A short answer is',
)
# Held-in training sets (name, split) this repository builds: captions, then VQA.
HELD_IN = (
    ("blip2_captions/coco_karpathy", "train"),
    ("blip2_captions/capfilt14m", "train"),
    ("blip2_captions/textcaps", "train"),
    ("blip2_vqa/vqav2", "train"),
    ("blip2_vqa/okvqa", "train"),
    ("blip2_vqa/aokvqa", "train"),
    ("blip2_vqa/ocrvqa", "train"),
)
CAPTION_PROMPT = "A short image caption:"     # LAVIS's InstructBLIP captioning eval prompt
VQA_PROMPT = "Question: {} Short answer:"    # its VQA eval prompt (Table 5's 5th)
STEPS = 60_000                               # paper §2.6: at most 60K steps
EVAL_EVERY = 3_000                           # paper §2.6: validation every 3K steps
_CAPTION_EVAL = dict(kind="caption", prompt=CAPTION_PROMPT, num_beams=5, min_new_tokens=10,
                     max_new_tokens=80, length_penalty=1.0, repetition_penalty=1.15)
_VQA_EVAL = dict(kind="vqa", template=VQA_PROMPT, num_beams=5, max_new_tokens=10,
                 min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.5)
HELD_OUT = {
    "nocaps": dict(_CAPTION_EVAL, dataset="blip2_captions/nocaps", split="val"),
    "flickr30k": dict(_CAPTION_EVAL, dataset="blip2_captions/flickr30k", split="test"),
    "gqa": dict(_VQA_EVAL, dataset="blip2_vqa/gqa", split="testdev", metric="gqa"),
    "vizwiz": dict(_VQA_EVAL, dataset="blip2_vqa/vizwiz", split="val"),
    "textvqa": dict(_VQA_EVAL, dataset="blip2_vqa/textvqa", split="val"),
}


def get_config(arg=None):
    llm, *pods = (arg or "flant5-xl").split(",")
    if llm not in LLMS or len(pods) > 1:
        raise ValueError(f"instruct takes LLM[,POD] with LLM one of {sorted(LLMS)}, got {arg!r}")
    preset, checkpoint, batch = LLMS[llm]
    c = defaults.base_config()
    c.model = preset
    overrides = {tower: dict(dtype="bfloat16") for tower in ("vision", "qformer", "llm")}
    if llm.startswith("vicuna"):
        # LAVIS's Vicuna tokenizer: "</s>" (2) is BOS and EOS, and generation stops on it (the
        # hub configs keep the decapoda-era ids 0 / 1).
        overrides["llm"].update(bos_token_id=2, eos_token_id=2)
    c.model_overrides = overrides
    c.init = dict(checkpoint=f"/path/to/stage2_{llm}/final",
                  qformer_text="/path/to/stage1_vit_g/final", random=())
    c.frozen = ("vision/.*", "llm/.*")    # the Q-Former, query tokens and projection train
    c.frozen_dtype = "bfloat16"
    c.loss = dict(lm=1.0)
    c.optimizer = dict(
        lr=1e-5,              # paper §2.6
        min_lr=0.0,           # cosine decay to 0
        warmup_lr=1e-8,       # linear warm-up from 1e-8
        warmup_steps=1000,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        clip_norm=0.0,        # none (LAVIS does not clip)
    )
    c.total_steps = STEPS
    c.batch_size = batch
    c.seed = 42                           # LAVIS's yamls' seed
    c.log_every_steps = 50
    c.checkpoint_every_steps = EVAL_EVERY
    c.data = dict(
        data_dir="/path/to/tfds_data",
        # No weights: each dataset ∝ √(its records) (pipeline.balanced_weights).
        train=[dict(name=name, split=split) for name, split in HELD_IN],
        templates=dict(caption=CAPTION_TEMPLATES, vqa=VQA_TEMPLATES),
        # LAVIS's InstructBLIP training processors: Vicuna blip2_image_train, FlanT5
        # blip_image_train (with RandAugment); the ViT is frozen either way.
        image_processor="blip2_image_train" if llm.startswith("vicuna") else "blip_image_train",
        flip=True,
        max_words=50,                     # LAVIS blip_caption / blip_question
        prompt="",
        question_template="{}",
        num_workers=8,                    # per host; tune to the host's cores
        num_threads=16,
        features="",                      # augmented images: no frozen-feature cache
    )
    c.text = dict(llm_tokenizer=f"/path/to/{checkpoint}",
                  qformer_tokenizer="/path/to/bert-base-uncased",
                  max_length=128)         # LAVIS max_txt_len
    c.eval.evaluators = {name: dict(spec) for name, spec in HELD_OUT.items()}
    c.eval.every_steps = EVAL_EVERY
    if pods:                              # mesh / remat / microbatches for a TPU pod
        defaults.apply_pod(c, f"instruct:{llm}", pods[0])
    return c
