"""What every training config starts from (configs/*.py: `c = defaults.base_config()`), so a
config file holds only what is particular to it. `train/loop.py` documents each key."""
import ml_collections

VQA_PROMPT = "Question: {} Short answer:"     # LAVIS's zero-shot VQA prompt (OPT and T5)
# The paper's evaluations (the paper §4, LAVIS eval yamls): configs/eval_blip2.py, and the
# fine-tune configs' in-training evaluation.
PAPER_EVALUATORS = {
    # beam 5, 8-30 tokens, "a photo of" (LAVIS@release passed only these).
    "coco_caption": dict(kind="caption", dataset="blip2_captions/coco_karpathy", split="test",
                         prompt="a photo of", num_beams=5, min_new_tokens=8,
                         max_new_tokens=30),
    # LAVIS's NoCaps yaml (beam 5, 10-80 tokens, length penalty 1).
    "nocaps": dict(kind="caption", dataset="blip2_captions/nocaps", split="val",
                   prompt="a photo of", num_beams=5, min_new_tokens=10, max_new_tokens=80,
                   length_penalty=1.0),
    # Flickr30K captioning (zero-shot transfer of a COCO-finetuned model): COCO's settings.
    "flickr_caption": dict(kind="caption", dataset="blip2_captions/flickr30k", split="test",
                           prompt="a photo of", num_beams=5, min_new_tokens=8,
                           max_new_tokens=30),
    # beam 5, ≤ 10 tokens, at least 1, length penalty -1 (the paper; LAVIS's OPT path
    # uses 0: set --config.eval.evaluators.vqav2.length_penalty=0 to follow it).
    "vqav2": dict(kind="vqa", dataset="blip2_vqa/vqav2", split="val", template=VQA_PROMPT,
                  num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0),
    "okvqa": dict(kind="vqa", dataset="blip2_vqa/okvqa", split="test", template=VQA_PROMPT,
                  num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0,
                  lemmatize=True),            # LAVIS apply_lemmatizer (spaCy en_core_web_sm)
    "gqa": dict(kind="vqa", dataset="blip2_vqa/gqa", split="testdev", template=VQA_PROMPT,
                num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0,
                metric="gqa"),
    # k_test 128, text max_length 35.
    "coco_retrieval": dict(kind="retrieval", dataset="blip2_captions/coco_karpathy",
                           split="test", k=128, max_length=35),
    # Zero-shot Flickr uses the COCO-finetuned retrieval model.
    "flickr_retrieval": dict(kind="retrieval", dataset="blip2_captions/flickr30k", split="test",
                             k=128, max_length=35),
}


# Where the paper's configs run best on each pod: mesh, per-tower remat policy, microbatches —
# found with `python -m blip2_jax.aot` (README, "Pods"). Select with the config arg's pod name
# (`configs/stage1.py:vit_g,v5p-128`). The batch axes (data x fsdp) must divide the global
# batch: 1680 / 2320 / 1520 allow at most 16 of the power-of-two pods' chips, the rest go to
# tensor (model) parallelism — or the batch is padded to a multiple (`pad_batch`).
_TP4 = dict(mesh=dict(data=16, fsdp=1, tensor=4))      # batch 16-way, model 4-way (64 chips)
POD_SETTINGS: dict = {
    # 1680 padded to 1728 rows: 64-way data parallel (with the ITM K/V reuse of configs/stage1.py)
    # estimated 113 ms per step against 168 ms for 16 x 4-way tensor.
    ("stage1:vit_g", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1), pad_batch=True),
    # 2320 padded to 2368 rows: 99.8 ms (16 x 4-way tensor: 150 ms, compiled from an earlier state
    # of the code: README "Pods").
    ("stage1:vit_l", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1), pad_batch=True),
    ("stage2:opt-2.7b", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    ("stage2:opt-6.7b", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    # 1520 padded to 1536 rows (config.pad_batch): 64-way data parallel beat 16 x 4-way tensor
    # (estimated 133 vs 151 ms per step).
    ("stage2:flant5-xl", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1), pad_batch=True),
    # 64-way data parallel with the 11B frozen T5 replicated: 42 GiB per chip, 244 ms.
    ("stage2:flant5-xxl", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1), pad_batch=True),
    # The 8B frozen LLaMA replicated (16.8 GiB in bf16) beside 30 rows per chip: 34.5 GiB,
    # estimated 245 ms (MFU 64.5 %).
    ("stage2:llama3-8b", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    # VQA fine-tuning (Table 8: batch 128, 490 px, the ViT trained with full remat): data
    # parallel, 2 rows per chip (memory compiled, README "Pods").
    ("vqa_ft:opt-2.7b", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    ("vqa_ft:opt-6.7b", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    ("vqa_ft:flant5-xl", "v5p-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    ("vqa_ft:opt-2.7b", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1)),
    ("vqa_ft:opt-6.7b", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1)),
    ("vqa_ft:flant5-xl", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1)),
    # Instruction tuning (InstructBLIP: batch 128 / 64 / 192 / 64, 224 px, the ViT and LLM
    # frozen): data parallel, 1-6 rows per chip (memory compiled, README "Pods").
    **{(f"instruct:{llm}", pod): dict(mesh=dict(data=chips, fsdp=1, tensor=1))
       for llm in ("vicuna-7b", "vicuna-13b", "flant5-xl", "flant5-xxl")
       for pod, chips in (("v5p-128", 64), ("v5p-64", 32))},
    # 1680 padded to 1696 rows: 225 ms against 259 ms for 16 x 2-way tensor.
    ("stage1:vit_g", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1), pad_batch=True),
    # 2320 padded to 2336 rows: 28.3 GiB, 186 ms.
    ("stage1:vit_l", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1), pad_batch=True),
    # 60 rows per chip: 22.9 GiB. XLA's estimate needs the unrolled copy, which fits only as 2
    # microbatches (278 ms, 16.2 GiB); one batch does the same work with one pass of the weights.
    ("stage2:opt-2.7b", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1)),
    # 33.9 GiB; estimated as 2 microbatches 428 ms (MFU 68.5 %).
    ("stage2:opt-6.7b", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1)),
    # 27.6 GiB; estimated as 2 microbatches 241 ms (MFU 47 %).
    ("stage2:flant5-xl", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1), pad_batch=True),
    # 59.6 GiB; estimated as 2 microbatches 470 ms (MFU 58.9 %).
    ("stage2:flant5-xxl", "v5p-64"): dict(mesh=dict(data=32, fsdp=1, tensor=1), pad_batch=True),
    # v4 and v5e: XLA gives no time estimate, so these are the most data-parallel meshes that
    # fit (memory compiled, README "Pods"); as on v5p, 64-way data parallelism beat tensor
    # parallelism wherever both were estimated.
    ("stage1:vit_g", "v4-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1), pad_batch=True),
    ("stage1:vit_l", "v4-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1), pad_batch=True),
    ("stage2:opt-2.7b", "v4-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    ("stage2:opt-6.7b", "v4-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1)),
    ("stage2:flant5-xl", "v4-128"): dict(mesh=dict(data=64, fsdp=1, tensor=1), pad_batch=True),
    # The 11B frozen T5 replicated needs 40 GiB of 32 (also as 2 microbatches); 2-way tensor
    # 34 GiB, with 2 microbatches 26.7 GiB (2-way FSDP with 2 microbatches: 27.8).
    ("stage2:flant5-xxl", "v4-128"): dict(mesh=dict(data=32, fsdp=1, tensor=2), microbatches=2,
                                          pad_batch=True),
    ("stage1:vit_g", "v5e-256"): dict(mesh=dict(data=256, fsdp=1, tensor=1), pad_batch=True),
    ("stage1:vit_l", "v5e-256"): dict(mesh=dict(data=256, fsdp=1, tensor=1), pad_batch=True),
    ("stage2:opt-2.7b", "v5e-256"): dict(mesh=dict(data=128, fsdp=1, tensor=2)),
    # The frozen LLMs do not fit 16 GiB whole: split 4 ways over tensor.
    ("stage2:opt-6.7b", "v5e-256"): dict(mesh=dict(data=64, fsdp=1, tensor=4)),
    ("stage2:flant5-xl", "v5e-256"): dict(mesh=dict(data=256, fsdp=1, tensor=1), pad_batch=True),
    # 16 x 16-way FSDP needs 28 GiB per chip (the gathered layers); 4-way tensor fits.
    ("stage2:flant5-xxl", "v5e-256"): dict(mesh=dict(data=64, fsdp=1, tensor=4),
                                           pad_batch=True),
}


def apply_pod(c: ml_collections.ConfigDict, key: str, pod: str) -> None:
    """Set `c.mesh`, `c.microbatches` and the towers' remat policies for `pod` from
    POD_SETTINGS[(key, pod)] (key: "stage1:vit_g", "stage2:opt-2.7b", ...)."""
    known = sorted(p for k, p in POD_SETTINGS if k == key)
    if (key, pod) not in POD_SETTINGS:
        raise ValueError(f"no pod settings for {key} on {pod!r}; known pods: {known}")
    s = POD_SETTINGS[(key, pod)]
    c.mesh = dict(s["mesh"])
    c.microbatches = int(s.get("microbatches", 1))
    c.pad_batch = bool(s.get("pad_batch", False))
    overrides = dict(c.get("model_overrides") or {})
    for tower, policy in (s.get("remat") or {}).items():
        overrides[tower] = dict(overrides.get(tower, {}), remat_policy=policy)
    c.model_overrides = overrides


def tiny_stage2_training(c: ml_collections.ConfigDict) -> None:
    """The training knobs the tiny runs with an LLM share (configs/tiny_stage2.py, tiny_vqa.py,
    tiny_instruct.py): the ViT and the LLM frozen, the LM loss, 40 steps of 16 at LR 1e-3."""
    c.frozen = ("vision/.*", "llm/.*")
    c.loss = dict(lm=1.0)
    c.optimizer.update(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5)
    c.total_steps = 40
    c.batch_size = 16
    c.log_every_steps = 10
    c.checkpoint_every_steps = 20


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.frozen_dtype = "bfloat16"
    c.optimizer = dict(b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, clip_norm=0.0)
    # Pure data parallelism over every device unless a config says otherwise.
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # Gradient accumulation: the global batch runs as this many microbatches (train/step.py).
    c.microbatches = 1
    # A batch the mesh's batch axes do not divide: pad each step to the next multiple with rows
    # the losses leave out (else the run refuses to start).
    c.pad_batch = False
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.stop_after_steps = 0            # > 0: end the run at that step, as a preemption would
    c.on_nonfinite = "stop"           # or "skip" (the update)
    # A re-run resumes only with the config it was trained with (total_steps, logging, checkpoint
    # and evaluation settings aside: run_config.RESUMABLE_CHANGES); True continues with the new
    # values, logging them and keeping the old config.json.
    c.allow_config_change = False
    # Sharding: `rules` (logical axis, mesh axes) pairs, empty for sharding.DEFAULT_RULES;
    # `overrides` {parameter-path regex: rules} (run_config.sharding_rules); `zero1`: the
    # optimizer state split over the batch axes too, each device updating its slice (ZeRO-1).
    c.sharding = dict(rules=[], overrides={}, zero1=False)
    c.peak_tflops_per_device = 0.0    # set for the accelerator to log MFU
    # Evaluators by name (blip2_jax/eval/evaluators.py): train.py runs them every `every_steps`
    # steps and at the end (0: never), eval.py on a run or a checkpoint. `batch_size` is global.
    c.eval = dict(every_steps=0, batch_size=32, report_examples=16, dtype="", evaluators={})
    return c


# The pre-training mixture of both stages: tfds name, weight, image processor (LAVIS yaml).
# Weights: the paper gives only the totals (129M images, 115M of them LAION); the per-set
# sizes are the BLIP / ALBEF paper's pre-training table (entries: image-caption pairs for COCO and
# VG, whose LAVIS/BLIP annotation files hold one entry per caption; images for the web sets). A
# uniform draw over the concatenated datasets (what BLIP's and LAVIS's loaders do) samples each
# dataset in proportion to its entries, so the weights are the entry counts, in millions.
# If your copies of the web datasets are smaller (dead links), use the sizes you built instead
# (each dataset's metadata.json lists its examples).
PRETRAINING_SOURCES = (
    ("blip2_captions/coco_karpathy", 0.567, "blip2_image_train"),   # 113K images, 567K captions
    ("blip2_captions/vg", 0.769, "blip_image_train"),               # 100K images, 769K captions
    ("blip2_captions/cc3m", 2.95, "blip2_image_train"),
    ("blip2_captions/cc12m", 10.06, "blip2_image_train"),
    ("blip2_captions/sbu", 0.86, "blip2_image_train"),
    ("blip2_captions/laion115m", 115.0, "blip2_image_train"),
)


def pretraining_data() -> dict:
    """`config.data` of both pre-training stages. Image size: the model's (224), which the
    loop passes to the pipeline."""
    return dict(
        data_dir="/path/to/tfds_data",
        train=[dict(name=name, split="train", weight=weight, image_processor=proc)
               for name, weight, proc in PRETRAINING_SOURCES],
        image_processor="blip2_image_train",
        flip=True,
        max_words=50,                    # LAVIS blip_caption
        prompt="",                       # pre-training prompt
        num_workers=8,                   # per host; tune to the host's cores
        num_threads=16,
        # A frozen-feature cache directory (blip2_jax/data/features.py): train from the ViT's
        # precomputed outputs. Only without augmentation: image_processor="blip_image_eval".
        features="",
    )


def synthetic_data(data_dir: str, name: str = "synthetic", **overrides) -> dict:
    """`config.data` for training toy models on the built-in synthetic dataset, or on another
    caption set of small rendered scenes (`name`: blip2_captions/NAME)."""
    return dict(data_dir=data_dir, train=dict(name=f"blip2_captions/{name}", split="train"),
                # No crops or flips: the captions say where each object is.
                image_processor="blip_image_eval", flip=False, prompt="",
                num_workers=0, num_threads=2, **{"features": "", **overrides})


def synthetic_evaluators(*kinds: str, split: str = "test", **settings) -> dict:
    """`config.eval.evaluators` of the given kinds ("retrieval", "caption", "vqa"; named
    KIND_SPLIT) on the run's own training set (no `dataset`: they follow config.data.train);
    `settings` go to each. Its VQA prompt is the bare question: the synthetic language has no
    "Question:" words."""
    out = {}
    for kind in kinds:
        extra = {"template": "{}"} if kind == "vqa" else {}
        out[f"{kind}_{split}"] = dict(kind=kind, split=split, **extra, **settings)
    return out
