"""The demo: BLIP-2's recipe at toy scale on the synthetic dataset (`python -m blip2_jax.demo`),
or on your own (`--annotations`: the arg's third part names the dataset).

    configs/demo.py:stage1,WORK[,DATASET]   stage 1 (ITC + ITM + ITG), frozen image encoder from WORK/unimodal
    configs/demo.py:stage2,WORK   stage 2 (OPT LM), Q-Former from WORK/stage1/final, frozen LM from
                                  WORK/unimodal
    configs/demo.py:stage2_fresh,WORK   the same stage 2 from a fresh Q-Former (no stage 1): the
                                  paper's Fig. 5 ablation (`python -m blip2_jax.demo --ablation`)
    configs/demo.py:vqa_ft,WORK   VQA fine-tuning (configs/vqa_ft.py's recipe: question-aware
                                  Q-Former, answer loss) from WORK/stage2/final and the Q-Former
                                  text side of WORK/stage1/final (`demo --vqa-finetune`)

WORK defaults to out/demo, but stage 2 starts from a stage-1 model only when it is named: by WORK
(`stage2,WORK`: the stage-1 run of that work directory, where the demo trains it) or by
`--config.init.stage1=DIR`; `stage2` alone leaves a placeholder that fails naming the key.

WORK/data holds the dataset (blip2_captions/DATASET, blip2_vqa/DATASET; DATASET defaults to
synthetic) and its tokenizers (WORK/data/tokenizers/DATASET); WORK/unimodal the pre-trained image
encoder and language model (blip2_jax/train/unimodal.py). Training and the evaluators read
DATASET (evaluators without a dataset follow config.data.train). The vocabulary sizes are the
synthetic tokenizers'; the demo sets `model_overrides` to another dataset's.
"""
from blip2_jax.data import synthetic
from blip2_jax.eval import retrieval
from blip2_jax.train import defaults

# A 72 px image is a 6x6 grid of 12 px patches: each cell of the 3x3 scene grid is 2x2 patches.
VISION = dict(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, image_size=72,
              patch_size=12)
# No dropout: a from-scratch Q-Former this small, trained for minutes, underfits (with BERT's 0.1
# its held-out R@1 was a quarter of what it is without).
QFORMER = dict(vocab_size=100, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
               max_position_embeddings=64, cross_attention_frequency=1, encoder_hidden_size=128,
               hidden_dropout=0.0, attention_dropout=0.0)
LLM = dict(vocab_size=384, hidden_size=128, num_layers=2, num_heads=4, ffn_dim=256,
           max_position_embeddings=128, word_embed_proj_dim=128)
NUM_QUERIES = 8


def get_config(arg="stage1,out/demo"):
    stage, _, work = arg.partition(",")
    work, _, dataset = work.partition(",")
    dataset = dataset or "synthetic"
    stage1 = f"{work}/stage1/final" if work else "/path/to/stage1_run/final"
    work = work or "out/demo"
    stages = ("stage1", "stage2", "stage2_fresh", "vqa_ft")
    if stage not in stages:
        raise ValueError(f"demo config takes 'STAGE,WORK[,DATASET]' with STAGE one of {stages}, "
                         f"got {arg!r}")
    c = defaults.base_config()
    if stage == "stage1":
        c.model = "tiny-stage1"
        c.model_overrides = dict(vision=VISION, qformer=QFORMER, num_query_tokens=NUM_QUERIES,
                                 embed_dim=64)
        c.init = dict(vision=f"{work}/unimodal",
                      random=("qformer", "query_tokens", "vision_proj", "text_proj", "temp",
                              "itm_head", "lm_head"))
        c.frozen = ("vision/.*",)
        c.loss = dict(itc=1.0, itm=1.0, itg=1.0)
        c.total_steps = 600
        # 1e-3 and above for every parameter train ITC visibly worse (held-out R@1 0.34 at 1e-3,
        # 0.73 at 3e-4). But at 3e-4 everywhere ITM ends on its prior plateau (0.636, the entropy
        # of 1 positive per 2 negatives: a constant output), where a from-scratch Q-Former stays
        # for a number of steps inversely proportional to its LR: a match needs image and text
        # fused inside the Q-Former layers, a product of weights that all start small. 5x on the
        # Q-Former and the ITM head leaves it by step 300-500 (ITM 0.47 / 0.59 at step 600 in
        # seeds 0 / 1), with held-out R@1 by ITC 0.70 / 0.35 against 0.77 / 0.19 at 3e-4
        # (bench/DEMO.md). 3x and 10x trained ITC worse.
        c.optimizer.update(lr=3e-4, min_lr=5e-5, warmup_lr=1e-5, warmup_steps=20,
                           lr_mult=(("qformer/.*", 5.0), ("itm_head/.*", 5.0)))
        c.text = dict(qformer_tokenizer=f"{{data_dir}}/tokenizers/{dataset}/qformer", max_length=32)
        # ITM re-ranks ITC's best 13 of the demo's 100 test images (LAVIS's k_test scaled to the
        # split; the demo sizes it to a dataset of one's own).
        c.eval.evaluators = defaults.synthetic_evaluators(
            "retrieval", k=retrieval.k_for_images(100))
        c.eval.every_steps = 200
    else:
        c.model = "tiny-opt"
        c.model_overrides = dict(vision=VISION, qformer=QFORMER, llm=LLM,
                                 num_query_tokens=NUM_QUERIES)
        if stage == "stage2":
            c.init = dict(stage1=stage1, llm=f"{work}/unimodal", random=("llm_proj",))
        else:   # the image encoder and its LayerNorm as stage 1 started them; the rest fresh
            c.init = dict(vision=f"{work}/unimodal", llm=f"{work}/unimodal",
                          random=("qformer", "query_tokens", "llm_proj"))
        c.frozen = ("vision/.*", "llm/.*")
        c.loss = dict(lm=1.0)
        # Held-out captions right (of 100, beam 5) and zero-shot VQA, stage 2 from the same
        # stage 1: 27 / 66.7 % after 1000 steps, 35 / 69.0 % after 2000 (bench/DEMO.md).
        # With 1000 steps, LR 1e-3 gave 9 / 56.0 %, 2e-3 24 / 63.3 %, 3e-3 23 / 62.3 %, 5e-3
        # 3 / 54.3 % (an image encoder trained half as long then).
        c.total_steps = 2000
        c.optimizer.update(lr=2e-3, min_lr=5e-5, warmup_lr=1e-5, warmup_steps=20)
        c.text = dict(llm_tokenizer=f"{{data_dir}}/tokenizers/{dataset}/opt", max_length=48)
        # Stage 2 trains on captions only: its VQA is zero-shot, as the paper's, asked in the
        # paper's prompt, which the frozen LM read in its text-only pre-training.
        c.eval.evaluators = defaults.synthetic_evaluators("caption", "vqa", num_beams=3)
        c.eval.evaluators.vqa_test.template = synthetic.VQA_PROMPT
        c.eval.evaluators.caption_test.update(num_beams=5, max_new_tokens=48)
        c.eval.every_steps = 500
    if stage == "vqa_ft":
        # The paper's VQA fine-tune (§4.3) at toy scale: the Q-Former also reads the question,
        # its text side from stage 1; the answer is the target; the ViT stays frozen here.
        c.model_overrides = dict(vision=VISION, qformer=dict(QFORMER, has_text_input=True),
                                 llm=LLM, num_query_tokens=NUM_QUERIES, qformer_text_input=True)
        c.init = dict(checkpoint=f"{work}/stage2/final", qformer_text=f"{work}/stage1/final",
                      random=())
        c.total_steps = 600
        c.optimizer.update(lr=1e-4, min_lr=5e-6, warmup_lr=1e-6, warmup_steps=20)
        c.text.qformer_tokenizer = f"{{data_dir}}/tokenizers/{dataset}/qformer"
        c.eval.evaluators = defaults.synthetic_evaluators("vqa", num_beams=3)
        c.eval.evaluators.vqa_test.template = synthetic.VQA_PROMPT
        c.eval.every_steps = 200
    # Stage 1 from scratch on the toy scenes depends much on the seed (Q-Former init and batch
    # order), and the seeds' order differs from machine to machine (bench/DEMO.md). The demo
    # runs seed 2, chosen near the median of seeds 0-3 on one machine.
    c.seed = 2
    c.frozen_dtype = "float32"      # tiny towers: keep full precision
    c.batch_size = 32
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    # Both stages train from the frozen ViT's cached outputs (the data is un-augmented): stage 1
    # computes them, stage 2 (the same ViT, through stage 1's export) reuses them.
    c.data = defaults.synthetic_data(f"{work}/data", dataset, features=f"{work}/features")
    if stage == "vqa_ft":
        c.data.train = dict(name=f"blip2_vqa/{dataset}", split="train")
        c.data.question_template = synthetic.VQA_PROMPT
    return c
