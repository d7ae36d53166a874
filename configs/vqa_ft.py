"""BLIP-2 VQA fine-tuning (answer generation): the paper's Table 8 and Fig. 7 (LAVIS released
no BLIP-2 VQA fine-tuning config).

    python train.py --config configs/vqa_ft.py:opt-2.7b --workdir /runs/vqa_opt-2.7b \\
        --config.data.data_dir=/data/tfds \\
        --config.init.checkpoint=/runs/stage2_opt-2.7b/final \\
        --config.init.qformer_text=/runs/stage1_vit_g/final \\
        --config.text.llm_tokenizer=/models/blip2-opt-2.7b \\
        --config.text.qformer_tokenizer=/models/bert-base-uncased

Arg: the LLM, `opt-2.7b` (default), `opt-6.7b` or `flant5-xl` (Table 8's three models); a last
`,POD` picks mesh / remat / microbatches from `defaults.POD_SETTINGS` (v5p-128 and v5p-64: data
parallel, memory compiled; README "Pods"). Every "/path/to/..." below is a
placeholder: set it with `--config.KEY=...` as above.

- Model: the stage-2 model at 490 px (Table 8), its Q-Former made question-aware (Fig. 7: the
  question's tokens go to the Q-Former, whose queries attend to them in its bidirectional
  self-attention; `qformer_text_input`). The Q-Former and the ViT are trained, the LLM stays
  frozen in bf16 with no optimizer state. The ViT gets layer-wise LR decay 0.95 (FlanT5-XL,
  OPT-2.7B) / 0.9 (OPT-6.7B) (Table 8); LAVIS's gradient checkpointing becomes full remat of
  the ViT blocks, as in configs/caption_coco_ft.py.
- Initialisation: `init.checkpoint`, a stage-2 model (a `stage2.py:LLM` run's `final/` or the
  released `Salesforce/blip2-*`), built at 224 px: its position table is interpolated to the
  35x35 grid of 490 px when loaded. A stage-2 model has no Q-Former text side (LAVIS deletes the
  word/position tables and the text FFN), so `init.qformer_text` takes it from the stage-1
  model the stage-2 run started from.
- Loss: the answer's LM loss (paper §4.3, "open-ended answer generation"). The prompt
  "Question: {} Answer:" (Table 8) holds the question, LAVIS-cleaned (`blip_question`); OPT
  reads `[BOS] prompt answer "\\n"` with the loss on the answer and "\\n" only, FlanT5's encoder
  the prompt and its decoder the answer. The Q-Former reads the same filled prompt, so the
  exported model answers through `Blip2.answer(images, questions,
  template="Question: {} Answer:")` as it was trained.
- Several ground-truth answers (VQAv2's ten): each step trains on one answer per question,
  drawn by its frequency among the question's answers from (seed, the example's position): in
  expectation LAVIS's count-weighted answer loss (`data.pipeline.draw_answer`).
- Data: VQAv2 train + val and Visual Genome QA (Table 8), built with
  `python -m blip2_jax.data.build vqa --annotations train=vqa_train.json val=vqa_val.json
  heldout=FILE --image-root coco/images --data-dir D --name vqav2` (LAVIS's / BLIP's JSON) and
  `... vqa --annotations vg_qa.json --image-root vg/images --name vg_qa`, mixed in proportion
  to their questions (a uniform draw over their concatenation). Training images:
  `blip_image_train` at 490 px (LAVIS's VQA training processor, RandAugment and flips).
- Steps: "5 epochs" (Table 8) of the three sets' questions at batch 128 (Table 8); warm-up
  1000 steps (the paper's fine-tunes), LR 1e-5 (Table 8), AdamW (0.9, 0.999), weight decay 0.05.
- Evaluation: once per epoch, the official VQA accuracy (`vqa` evaluator; beam 5, at most 10
  new tokens, length penalty -1, Table 8 / paper §4.3) on `blip2_vqa/vqav2` split `heldout`:
  VQAv2 questions kept out of training (val is trained on, and test-dev is scored by the
  evaluation server only), with the training prompt.
"""
from blip2_jax.train import defaults

LLMS = {
    # arg: (preset, BLIP-2 checkpoint name (its LLM tokenizer), ViT layer-wise LR decay)
    "opt-2.7b": ("blip2-opt-2.7b", "blip2-opt-2.7b", 0.95),
    "opt-6.7b": ("blip2-opt-6.7b", "blip2-opt-6.7b", 0.9),
    "flant5-xl": ("blip2-flan-t5-xl", "blip2-flan-t5-xl", 0.95),
}
PROMPT = "Question: {} Answer:"                         # Table 8
IMAGE_SIZE = 490                                        # Table 8
BATCH = 128                                             # Table 8
EPOCHS = 5                                              # Table 8
# Questions per training set: VQAv2 train and val (the official v2 question counts; LAVIS's
# vqa_train.json / vqa_val.json hold one entry per question), and Visual Genome QA, whose count
# here is approximate and unverified: use the count of your build (its metadata.json lists the
# examples), which also sets the mixture weight and the steps below.
QUESTIONS = {"vqav2/train": 443_757, "vqav2/val": 214_354, "vg_qa/train": 1_440_000}
STEPS_PER_EPOCH = sum(QUESTIONS.values()) // BATCH      # LAVIS drops the last partial batch
STEPS = EPOCHS * STEPS_PER_EPOCH


def get_config(arg=None):
    llm, *pods = (arg or "opt-2.7b").split(",")
    if llm not in LLMS or len(pods) > 1:
        raise ValueError(f"vqa_ft takes LLM[,POD] with LLM one of {sorted(LLMS)} (Table 8), got "
                         f"{arg!r}")
    preset, checkpoint, layer_decay = LLMS[llm]
    c = defaults.base_config()
    c.model = preset
    c.model_overrides = dict(vision=dict(image_size=IMAGE_SIZE, remat_policy="full"),
                             qformer=dict(has_text_input=True), qformer_text_input=True)
    c.init = dict(checkpoint=f"/path/to/stage2_{llm}/final",
                  qformer_text="/path/to/stage1_vit_g/final", random=())
    c.frozen = ("llm/.*",)                # the ViT and the Q-Former are fine-tuned
    c.frozen_dtype = "bfloat16"           # the frozen LLM (paper: OPT fp16, FlanT5 bf16)
    c.loss = dict(lm=1.0)
    c.optimizer = dict(
        lr=1e-5,              # Table 8
        min_lr=0.0,           # as LAVIS's fine-tunes (the paper does not say)
        warmup_lr=1e-8,       # as LAVIS's fine-tunes (the paper does not say)
        warmup_steps=1000,    # Table 8
        b1=0.9,
        b2=0.999,             # Table 8 (AdamW 0.9, 0.999)
        eps=1e-8,
        weight_decay=0.05,    # Table 8
        clip_norm=0.0,        # none (LAVIS does not clip)
        vit_layer_decay=layer_decay,      # Table 8
    )
    c.total_steps = STEPS
    c.batch_size = BATCH
    c.seed = 42                           # LAVIS's yamls' seed
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.data = dict(
        data_dir="/path/to/tfds_data",
        train=[dict(name=f"blip2_vqa/{name.split('/')[0]}", split=name.split("/")[1],
                    weight=n / 1e6) for name, n in QUESTIONS.items()],
        image_processor="blip_image_train",   # LAVIS's VQA training processor
        flip=True,                            # as LAVIS (a flip swaps left and right)
        max_words=50,                         # LAVIS blip_question
        question_template=PROMPT,
        prompt="",
        num_workers=8,                        # per host; tune to the host's cores
        num_threads=16,
        features="",                          # the ViT trains: no frozen-feature cache
    )
    c.text = dict(llm_tokenizer=f"/path/to/{checkpoint}",
                  qformer_tokenizer="/path/to/bert-base-uncased",
                  # Prompt + answer in one row: room for the template around a 25-word
                  # question and a short answer.
                  max_length=48)
    c.eval.evaluators = dict(vqav2_heldout=dict(
        defaults.PAPER_EVALUATORS["vqav2"], split="heldout", template=PROMPT))
    c.eval.every_steps = STEPS_PER_EPOCH
    if pods:                              # mesh / remat / microbatches for a TPU pod
        defaults.apply_pod(c, f"vqa_ft:{llm}", pods[0])
    return c
