"""BLIP-2 stage-2 pre-training (generative learning: the Q-Former's queries, projected by one FC
layer, prefix a frozen LLM) with the paper's hyper-parameters (paper §3.4 / Appendix) and its LM
losses, differences from LAVIS's `pretrain_stage2.yaml` noted inline.

    python train.py --config configs/stage2.py:opt-2.7b --workdir /runs/stage2_opt-2.7b \\
        --config.data.data_dir=/data/tfds \\
        --config.init.stage1=/runs/stage1_vit_g/final \\
        --config.init.llm=/models/blip2-opt-2.7b \\
        --config.text.llm_tokenizer=/models/blip2-opt-2.7b

Arg: the LLM, `opt-2.7b` (default), `opt-6.7b`, `flant5-xl`, `flant5-xxl` or `llama3-8b`, all
with the ViT-g stage-1 model; `opt-2.7b,vit_l` and `flant5-xl,vit_l` give the paper's two ViT-L rows (Table 2)
from a `stage1.py:vit_l` run. A last `,POD` (e.g. `opt-2.7b,v5p-128`) sets the mesh, remat and
microbatching found for that TPU pod (`defaults.POD_SETTINGS`, README "Pods"). Every
"/path/to/..." below is a placeholder: set it with `--config.KEY=...` as above.

Parameter sources (blip2_jax/train/init.py):
- `init.stage1`: a stage-1 run's `final/` directory: the frozen image encoder, ln_vision, the
  Q-Former (its query path; the text-only parts are not in a stage-2 model) and query_tokens.
- `init.llm`: a BLIP-2 checkpoint directory whose LLM is the frozen tower (`llm/`): the released
  `Salesforce/blip2-opt-2.7b`, `-opt-6.7b`, `-flan-t5-xl`, `-flan-t5-xxl` hold the unchanged
  facebook/opt-* / google/flan-t5-* weights (OPT's embedding padded to 50304 rows). A bare facebook/opt-* or google/flan-t5-* directory is not readable by
  `blip2_jax.load` yet. `llama3-8b` (not in the paper: the same recipe with a LLaMA-3 LLM) takes
  the plain HF `meta-llama/Meta-Llama-3-8B` directory (`LlamaForCausalLM` save_pretrained),
  which is also its tokenizer's directory.
- `init.random`: `llm_proj`, the FC layer LAVIS creates fresh (opt_proj / t5_proj).
The LLM tokenizer is read from the same BLIP-2 directory.

Data: the stage-1 mixture (same 129M images; see configs/stage1.py for the weights and
the dataset builds). Prompt "". LLaMA reads `<|begin_of_text|> caption <|end_of_text|>`, the
caption and its EOS the targets. FlanT5 trains as a prefix LM: the pipeline splits
each caption into an encoder prefix and a decoder target (the paper gives no split rule; ours is
in `blip2_jax.data.pipeline._split_prefix`).
"""
from blip2_jax.train import defaults

LLMS = {
    # arg: (preset with ViT-g, preset with ViT-L or None, BLIP-2 checkpoint name, global batch)
    # Batch sizes: the paper's Appendix (1920 for OPT, 1520 for FlanT5).
    "opt-2.7b": ("blip2-opt-2.7b", "blip2-pretrain-vit-l-opt-2.7b", "blip2-opt-2.7b", 1920),
    "opt-6.7b": ("blip2-opt-6.7b", None, "blip2-opt-6.7b", 1920),
    "flant5-xl": ("blip2-flan-t5-xl", "blip2-pretrain-vit-l-flan-t5-xl", "blip2-flan-t5-xl", 1520),
    "flant5-xxl": ("blip2-flan-t5-xxl", None, "blip2-flan-t5-xxl", 1520),
    # No paper row: OPT's batch.
    "llama3-8b": ("blip2-llama-3-8b", None, "Meta-Llama-3-8B", 1920),
}


def get_config(arg=None):
    llm, *rest = (arg or "opt-2.7b").split(",")
    vit = next((r for r in rest if r in ("vit_g", "vit_l")), "vit_g")
    pods = [r for r in rest if r not in ("vit_g", "vit_l")]
    if llm not in LLMS or len(pods) > 1:
        raise ValueError(f"stage2 takes LLM[,vit_g|vit_l][,POD] with LLM one of {sorted(LLMS)}, "
                         f"got {arg!r}")
    preset_g, preset_l, checkpoint, batch = LLMS[llm]
    if vit == "vit_l" and preset_l is None:
        raise ValueError(f"the paper trains {llm} with ViT-g only (ViT-L: opt-2.7b, flant5-xl)")
    c = defaults.base_config()
    c.model = preset_g if vit == "vit_g" else preset_l     # 224-px image encoder
    # Mixed precision (LAVIS trains under fp16 autocast): every tower computes in bf16;
    # trained parameters stay float32 (the Trainer keeps them so), frozen ones are stored bf16.
    c.model_overrides = {tower: dict(dtype="bfloat16") for tower in ("vision", "qformer", "llm")}
    c.init = dict(
        stage1=f"/path/to/stage1_{vit}/final",
        llm=f"/path/to/{checkpoint}",
        random=("llm_proj",),
    )
    c.frozen = ("vision/.*", "llm/.*")
    # Paper: frozen ViT and OPT in fp16, FlanT5 in bf16. bf16 for all here (no fp16 loss
    # scaling in this trainer).
    c.frozen_dtype = "bfloat16"
    c.loss = dict(lm=1.0)
    c.optimizer = dict(
        lr=1e-4,              # peak LR
        min_lr=5e-5,          # paper's stage-2 minimum; LAVIS pretrain_stage2.yaml: 1e-5
        warmup_lr=1e-6,       # LAVIS; the paper does not say where the warm-up starts
        warmup_steps=2000,    # the paper (LAVIS: 2000 too)
        b1=0.9,
        b2=0.98,              # paper; LAVIS's AdamW default is 0.999
        eps=1e-8,
        weight_decay=0.05,
        clip_norm=0.0,        # none (LAVIS does not clip)
    )
    c.total_steps = 80_000               # the paper (LAVIS: 10 epochs)
    c.batch_size = batch
    c.seed = 42                          # LAVIS's yaml seed (the paper gives none)
    # The default mesh is pure data parallelism; `,POD` in the arg picks one found for a pod.
    c.checkpoint_every_steps = 2000
    c.data = defaults.pretraining_data()
    c.text = dict(llm_tokenizer=f"/path/to/{checkpoint}",
                  max_length=32)         # LAVIS max_txt_len
    if pods:                             # mesh / remat / microbatches for a TPU pod
        defaults.apply_pod(c, f"stage2:{llm}" + (",vit_l" if vit == "vit_l" else ""), pods[0])
    return c
