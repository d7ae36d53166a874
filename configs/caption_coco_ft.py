"""BLIP-2 COCO captioning fine-tuning (OPT-2.7B): paper Table 7 and LAVIS
`lavis/projects/blip2/train/caption_coco_ft.yaml`, prompt "a photo of" (paper §4.1).

    python train.py --config configs/caption_coco_ft.py --workdir /runs/caption_coco_opt-2.7b \\
        --config.data.data_dir=/data/tfds \\
        --config.init.checkpoint=/runs/stage2_opt-2.7b/final \\
        --config.text.llm_tokenizer=/models/blip2-opt-2.7b

Every "/path/to/..." below is a placeholder: set it with `--config.KEY=...` as above.

- Model: BLIP-2 OPT-2.7B at 364 px; the Q-Former and the ViT are trained, the LLM
  stays frozen (Table 7; LAVIS `freeze_vit: False`, ViT in fp32). The ViT gets layer-wise LR
  decay 0.95 (Table 7; the transcription is ambiguous about which models' columns carry it —
  0.95 taken for OPT-2.7B). LAVIS's `use_grad_checkpoint: True` becomes full remat of the ViT
  blocks.
- Initialisation: `init.checkpoint`, a stage-2 OPT-2.7B model (a `stage2.py:opt-2.7b` run's
  `final/`, or the released `Salesforce/blip2-opt-2.7b`), built at 224 px. Its 16x16-patch
  position table is interpolated to the 26x26 grid of 364 px when it is loaded (LAVIS: bicubic,
  align_corners=False; `convert.sources`).
- Data: COCO Karpathy train as a `blip2_captions/coco_karpathy` dataset (built with
  `python -m blip2_jax.data.build captions --annotations coco_karpathy_train.json ...`: one
  record per caption, as LAVIS's file). Training image processor `blip_image_train` at 364 px
  (LAVIS yaml); prompt "a photo of " prepended to every caption (LAVIS text processor).
- Steps: "5 epochs" over the 566,747 captions of Karpathy train (113,287 images) at batch 256:
  566,747 / 256 = 2213.9, LAVIS drops the last partial batch, so 2,213 steps per epoch and
  5 x 2,213 = 11,065 steps.

The trainable ViT is differentiated (`LossConfig.train_vision`, set by the Trainer when
`frozen` leaves it out) and exported in float32; the OPT prompt mask covers BOS + "a photo of"
(4 tokens, as LAVIS: the prompt's trailing space is not a token of its own).
"""
from blip2_jax.train import defaults

KARPATHY_TRAIN_CAPTIONS = 566_747
BATCH = 256                                             # Table 7; LAVIS 16 x 16 GPUs
EPOCHS = 5                                              # Table 7
STEPS = EPOCHS * (KARPATHY_TRAIN_CAPTIONS // BATCH)     # 11,065


def get_config(arg=None):
    if arg not in (None, "", "opt-2.7b"):
        raise ValueError(f"caption_coco_ft is the OPT-2.7B recipe (Table 7); got {arg!r}")
    c = defaults.base_config()
    c.model = "blip2-opt-2.7b"
    c.model_overrides = dict(vision=dict(image_size=364,          # Table 7 / LAVIS image_size
                                         remat_policy="full"))    # LAVIS use_grad_checkpoint
    c.init = dict(checkpoint="/path/to/stage2_opt-2.7b/final", random=())
    c.frozen = ("llm/.*",)                # the ViT is fine-tuned (Table 7, LAVIS freeze_vit False)
    c.frozen_dtype = "bfloat16"           # the frozen OPT (paper / LAVIS: fp16)
    c.loss = dict(lm=1.0)
    c.optimizer = dict(
        lr=1e-5,              # Table 7 / LAVIS init_lr
        min_lr=0.0,           # LAVIS (the paper does not say)
        warmup_lr=1e-8,       # LAVIS (the paper does not say)
        warmup_steps=1000,    # Table 7 / LAVIS
        b1=0.9,
        b2=0.999,             # Table 7 (AdamW 0.9, 0.999) = LAVIS default
        eps=1e-8,
        weight_decay=0.05,    # Table 7 / LAVIS
        clip_norm=0.0,        # none (LAVIS does not clip)
        # Table 7. LAVIS computes lr_scale per ViT layer but its scheduler never applies it
        #; the paper's value is applied here.
        vit_layer_decay=0.95,
    )
    c.total_steps = STEPS
    c.batch_size = BATCH
    c.seed = 42                           # LAVIS's yaml seed
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    # Image size: the model's (364), which the loop passes to the pipeline.
    c.data = dict(
        data_dir="/path/to/tfds_data",
        train=dict(name="blip2_captions/coco_karpathy", split="train"),
        image_processor="blip_image_train",   # LAVIS caption_coco_ft.yaml (RandAugment)
        flip=True,
        max_words=50,                         # LAVIS blip_caption
        prompt="a photo of ",                 # the training text processor's prefix
        num_workers=8,                        # per host; tune to the host's cores
        num_threads=16,
    )
    c.text = dict(llm_tokenizer="/path/to/blip2-opt-2.7b",
                  max_length=32)              # LAVIS max_txt_len
    # LAVIS evaluates Karpathy val after every epoch (test once at the end: eval_blip2.py).
    c.eval.evaluators = dict(coco_caption_val=dict(defaults.PAPER_EVALUATORS["coco_caption"],
                                                   split="val"))
    c.eval.every_steps = STEPS // EPOCHS
    return c
