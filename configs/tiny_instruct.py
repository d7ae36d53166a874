"""Instruction tuning (configs/instruct.py's recipe) with the tiny InstructBLIP presets on the
synthetic dataset's captions and questions mixed: `:llama` (default) or `:t5` LLM, then
`,DATA_DIR`.

    python train.py --config configs/tiny_instruct.py:llama,data --workdir /tmp/tiny_instruct
    python eval.py --config configs/tiny_instruct.py:llama,data --workdir /tmp/tiny_instruct

- Both training splits in one run, each ∝ √(its records); per example one instruction template
  of its task drawn from (seed, position). The templates are in the synthetic language (its
  tokenizers were fitted to its captions and questions, which have no "Question:" or
  "A short image caption:"); configs/instruct.py has the paper's.
- The Q-Former reads the instruction; the ViT and the LLM are frozen. Every tower starts random
  unless sources are named, as configs/instruct.py does: `--config.init.checkpoint=STAGE2/final`
  (a tiny_stage2 run's) and `--config.init.qformer_text=STAGE1/final`.
- Evaluation: captioning (the first caption template as the prompt) and VQA accuracy (the bare
  question) on the test split.
"""
from blip2_jax.train import defaults

VOCAB = {"llama": 384, "t5": 256}     # the synthetic tokenizers' sizes
CAPTION_TEMPLATES = ("a picture of", "an image with", "there is")
VQA_TEMPLATES = ("{}", "a picture of {}", "{} is")


def get_config(arg=None):
    llm, _, data_dir = (arg or "llama").partition(",")
    if llm not in VOCAB:
        raise ValueError(f"tiny_instruct takes 'llama' or 't5', got {llm!r}")
    c = defaults.base_config()
    c.model = f"tiny-instructblip-{llm}"
    c.model_overrides = dict(llm=dict(vocab_size=VOCAB[llm]))
    c.init = dict(checkpoint="", qformer_text="", random=("*",))
    defaults.tiny_stage2_training(c)
    c.data = dict(defaults.synthetic_data(data_dir or "data", question_template="{}"),
                  train=[dict(name="blip2_captions/synthetic", split="train"),
                         dict(name="blip2_vqa/synthetic", split="train")],
                  templates=dict(caption=CAPTION_TEMPLATES, vqa=VQA_TEMPLATES))
    tokenizers = "{data_dir}/tokenizers/synthetic/"
    c.text = dict(llm_tokenizer=tokenizers + llm, qformer_tokenizer=tokenizers + "qformer",
                  max_length=48)       # a three-object caption and its instruction
    evaluators = defaults.synthetic_evaluators("caption", "vqa", num_beams=3, max_new_tokens=12)
    evaluators["caption_test"]["prompt"] = CAPTION_TEMPLATES[0]
    c.eval.evaluators = evaluators
    return c
