"""BLIP-2 COCO retrieval fine-tuning of the stage-1 model (ITC + ITM + ITG, no LLM): paper
Table 9 and LAVIS `lavis/projects/blip2/train/retrieval_coco_ft.yaml`, with
LAVIS's image-id-aware ITC / ITM for COCO.

    python train.py --config configs/retrieval_coco_ft.py:vit_g --workdir /runs/retrieval_vit_g \\
        --config.data.data_dir=/data/tfds \\
        --config.init.checkpoint=/runs/stage1_vit_g/final \\
        --config.text.qformer_tokenizer=/models/bert-base-uncased

Arg: `vit_g` (default; LR 1e-5, AdamW (0.9, 0.999)) or `vit_l` (LR 5e-6, AdamW (0.9, 0.98)):
Table 9's per-encoder columns (the ViT-g values agree with LAVIS's yaml). Every "/path/to/..."
below is a placeholder: set it with `--config.KEY=...` as above.

- Model: the stage-1 model (`blip2-pretrain-vit-g` / `-vit-l`: Q-Former with ITC, ITM and ITG
  heads) at 364 px; nothing is frozen: the ViT is fine-tuned with layer-wise LR decay 0.95
  (Table 9, LAVIS `freeze_vit: False`, `lr_layer_decay: 0.95`, ViT in fp32). LAVIS's
  `use_grad_checkpoint: True` (blip2_coco.yaml) becomes full remat of the ViT blocks.
- Initialisation: `init.checkpoint`, a stage-1 run's `final/` (224 px). Its position table is
  interpolated to the 26x26 grid of 364 px when it is loaded (LAVIS: bicubic, align_corners=False
  for EVA ViT-g, align_corners=True for CLIP ViT-L; `convert.sources`).
- Data: COCO Karpathy train as `blip2_captions/coco_karpathy` (one record per caption; captions
  of one image share `image_index`, which image-id ITC uses), processor `blip2_image_train` at
  364 px (LAVIS yaml).
- Steps: "5 epochs" over the 566,747 captions of Karpathy train at batch 224 (Table 9; LAVIS
  14 x 16 GPUs): 566,747 / 224 = 2530.1, LAVIS drops the last partial batch, so 2,530 steps per
  epoch and 5 x 2,530 = 12,650 steps.

The trainable ViT is differentiated (`LossConfig.train_vision`, set by the Trainer when
`frozen` leaves it out) and exported in float32.
"""
from blip2_jax.train import defaults

KARPATHY_TRAIN_CAPTIONS = 566_747
BATCH = 224                                             # Table 9; LAVIS 14 x 16 GPUs
EPOCHS = 5                                              # Table 9
STEPS = EPOCHS * (KARPATHY_TRAIN_CAPTIONS // BATCH)     # 12,650

VARIANTS = {
    # arg: (model preset, peak LR, beta2)  -- Table 9
    "vit_g": ("blip2-pretrain-vit-g", 1e-5, 0.999),
    "vit_l": ("blip2-pretrain-vit-l", 5e-6, 0.98),
}


def get_config(arg=None):
    vit = arg or "vit_g"
    if vit not in VARIANTS:
        raise ValueError(f"retrieval_coco_ft takes one of {sorted(VARIANTS)}, got {arg!r}")
    preset, lr, b2 = VARIANTS[vit]
    c = defaults.base_config()
    c.model = preset
    c.model_overrides = dict(vision=dict(image_size=364,          # Table 9 / LAVIS image_size
                                         remat_policy="full"))    # LAVIS use_grad_checkpoint
    # Every leaf, the ITC / ITM / ITG heads and temp included, comes from the stage-1 model.
    c.init = dict(checkpoint=f"/path/to/stage1_{vit}/final", random=())
    c.frozen = ()                          # nothing frozen: no LLM, the ViT is fine-tuned
    c.frozen_dtype = ""                    # (no frozen tower to cast)
    c.loss = dict(itc=1.0, itm=1.0, itg=1.0,   # Table 9: ITC + ITM + ITG
                  image_id_itc=True)           # LAVIS COCO retrieval: same-image positives
    c.optimizer = dict(
        lr=lr,
        min_lr=0.0,           # LAVIS (the paper does not say)
        warmup_lr=1e-8,       # LAVIS (the paper does not say)
        warmup_steps=1000,    # Table 9 / LAVIS
        b1=0.9,
        b2=b2,
        eps=1e-8,
        weight_decay=0.05,    # Table 9 / LAVIS
        clip_norm=0.0,        # none (LAVIS does not clip)
        # Table 9 / LAVIS lr_layer_decay (which LAVIS's scheduler never applies; the paper's
        # value is applied here).
        vit_layer_decay=0.95,
    )
    c.total_steps = STEPS
    c.batch_size = BATCH
    c.seed = 42                            # LAVIS's yaml seed
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    # Image size: the model's (364), which the loop passes to the pipeline.
    c.data = dict(
        data_dir="/path/to/tfds_data",
        train=dict(name="blip2_captions/coco_karpathy", split="train"),
        image_processor="blip2_image_train",   # LAVIS retrieval_coco_ft.yaml
        flip=True,
        max_words=50,                          # LAVIS blip_caption
        prompt="",
        num_workers=8,                         # per host; tune to the host's cores
        num_threads=16,
    )
    c.text = dict(qformer_tokenizer="/path/to/bert-base-uncased",
                  max_length=32)               # LAVIS max_txt_len
    # LAVIS evaluates Karpathy val after every epoch (test once at the end: eval_blip2.py).
    c.eval.evaluators = dict(coco_retrieval_val=dict(
        defaults.PAPER_EVALUATORS["coco_retrieval"], split="val"))
    c.eval.every_steps = STEPS // EPOCHS
    return c
