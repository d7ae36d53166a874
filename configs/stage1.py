"""BLIP-2 stage-1 pre-training (representation learning: ITC + ITM + ITG) of the Q-Former against
a frozen image encoder, with the paper's hyper-parameters (paper §3.4 / Appendix), differences from LAVIS's
`pretrain_stage1.yaml` noted inline.

    python train.py --config configs/stage1.py:vit_g --workdir /runs/stage1_vit_g \\
        --config.data.data_dir=/data/tfds \\
        --config.init.qformer_bert=/models/bert-base-uncased \\
        --config.text.qformer_tokenizer=/models/bert-base-uncased \\
        --config.init.vision=/models/eva_vit_g.pth

Arg: `vit_g` (default; EVA-CLIP ViT-g/14, batch 1680) or `vit_l` (CLIP ViT-L/14, batch 2320),
optionally `,POD` (e.g. `vit_g,v5p-128`): the mesh, remat and microbatching found for that TPU pod
(`defaults.POD_SETTINGS`, README "Pods"); without one the mesh is pure data parallelism.
Every "/path/to/..." below is a placeholder: set it with `--config.KEY=...` as above.

Parameter sources (blip2_jax/train/init.py):
- `init.qformer_bert`: a bert-base-uncased directory (HF layout, with its MLM head). It gives the
  Q-Former (cross-attention fresh, query FFN copied from the text FFN), `query_tokens` (fresh)
  and the ITG head `lm_head/` (BERT's MLM head), as LAVIS `init_Qformer` does.
- `init.vision`: the frozen image encoder's own file, as LAVIS builds it: `eva_vit_g.pth`
  (EVA-CLIP ViT-g, 40 blocks of which the first 39 are used) or LAVIS's `clip_vit_L.pth`
  (CLIP ViT-L/14, 23 of 24 blocks) — read safely by `blip2_jax.convert` (any BLIP-2
  checkpoint directory works too, but its `ln_vision/` is already trained).
- `init.random`: what LAVIS creates fresh in `Blip2Qformer.__init__`: ln_vision (LayerNorm
  ones/zeros), vision_proj, text_proj, temp (0.07), itm_head. (`lm_head` is not listed:
  init.qformer_bert provides it.)

Data: the paper's pre-training mixture: COCO, Visual Genome, CC3M, CC12M, SBU and 115M
LAION-400M images, 129M images in all, each a `blip2_captions/NAME` dataset built with
`python -m blip2_jax.data.build captions --annotations FILE.json --image-root DIR --data-dir
DATA_DIR --name NAME`. The web datasets (CC3M, CC12M, SBU, LAION) should be built from the CapFilt
annotations with the two kept captions per image in each entry's "caption" list: the pipeline
draws one of a record's captions at random every time it reads it, as the paper samples one of
the top two. Visual Genome uses `blip_image_train` (RandAugment) as in LAVIS's yaml, the others
`blip2_image_train` (random resized crop + flip).
"""
from blip2_jax.train import defaults

VARIANTS = {
    # arg: (model preset, global batch size)  -- batch sizes: the paper's Appendix
    "vit_g": ("blip2-pretrain-vit-g", 1680),
    "vit_l": ("blip2-pretrain-vit-l", 2320),
}


def get_config(arg=None):
    vit, _, pod = (arg or "vit_g").partition(",")
    if vit not in VARIANTS:
        raise ValueError(f"stage1 takes VIT[,POD] with VIT one of {sorted(VARIANTS)}, got "
                         f"{arg!r}")
    preset, batch = VARIANTS[vit]
    c = defaults.base_config()
    c.model = preset                     # Q-Former with ITC / ITM / ITG heads; 224-px image encoder
    # Mixed precision (LAVIS trains under fp16 autocast): every tower computes in bf16;
    # trained parameters stay float32 (the Trainer keeps them so), frozen ones are stored bf16.
    c.model_overrides = {tower: dict(dtype="bfloat16") for tower in ("vision", "qformer")}
    c.init = dict(
        qformer_bert="/path/to/bert-base-uncased",
        vision="/path/to/eva_vit_g.pth" if vit == "vit_g" else "/path/to/clip_vit_L.pth",
        random=("ln_vision", "vision_proj", "text_proj", "temp", "itm_head"),
    )
    c.frozen = ("vision/.*",)
    # Paper: frozen ViT in fp16; bf16 here (no fp16 loss scaling in this trainer).
    c.frozen_dtype = "bfloat16"
    # itm_image_kv_once: the ITM pass reuses the query pass's cross-attention K/V of the images
    # instead of projecting 3B paired images (train/step.py): the same step, 7.7 % fewer FLOPs
    # per device in the v5p-128 compile.
    c.loss = dict(itc=1.0, itm=1.0, itg=1.0, itm_image_kv_once=True)
    c.optimizer = dict(
        lr=1e-4,              # peak LR
        # Paper gives a minimum LR only for stage 2; stage 1 uses LAVIS's min_lr.
        min_lr=1e-5,
        warmup_lr=1e-6,       # LAVIS; the paper does not say where the warm-up starts
        warmup_steps=2000,    # paper; LAVIS pretrain_stage1.yaml uses 5000
        b1=0.9,
        b2=0.98,              # paper; LAVIS's AdamW default is 0.999
        eps=1e-8,
        weight_decay=0.05,
        clip_norm=0.0,        # none (LAVIS does not clip)
    )
    # Paper: 250k steps, cosine per step here; LAVIS: 10 epochs, cosine per epoch.
    c.total_steps = 250_000
    c.batch_size = batch
    c.seed = 42                          # LAVIS's yaml seed (the paper gives none)
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    c.data = defaults.pretraining_data()
    c.text = dict(qformer_tokenizer="/path/to/bert-base-uncased",
                  max_length=32)         # LAVIS max_txt_len
    if pod:                              # mesh / remat / microbatches for a TPU pod
        defaults.apply_pod(c, f"stage1:{vit}", pod)
    return c
