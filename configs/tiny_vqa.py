"""VQA fine-tuning (answer generation, configs/vqa_ft.py's step) with the tiny presets on the
synthetic dataset's questions: `:opt` (default), `:llama` or `:t5` LLM, then `,DATA_DIR`.

    python train.py --config configs/tiny_vqa.py:opt,data --workdir /tmp/tiny_vqa
    python eval.py --config configs/tiny_vqa.py:opt,data --workdir /tmp/tiny_vqa

- The Q-Former reads the question (question-aware, `qformer_text_input`, as the paper's VQA
  fine-tune); the LLM is frozen. Every tower starts random unless sources are named, as
  configs/vqa_ft.py does: `--config.init.checkpoint=STAGE2/final` (a tiny_stage2 run's) and
  `--config.init.qformer_text=STAGE1/final` (a stage-2 model has no Q-Former text side).
- The prompt is the bare question ("{}"), as the synthetic evaluators': the synthetic
  language's tokenizers were fitted to its captions and questions, which have no "Question:" or
  "Answer:" (configs/vqa_ft.py has the paper's template).
- The training answer is one of the question's answers drawn by frequency (the synthetic set's
  ten answers agree); evaluation is the official VQA accuracy on the test split.
"""
from blip2_jax.train import defaults

VOCAB = {"opt": 384, "llama": 384, "t5": 256}     # the synthetic tokenizers' sizes


def get_config(arg=None):
    llm, _, data_dir = (arg or "opt").partition(",")
    if llm not in VOCAB:
        raise ValueError(f"tiny_vqa takes 'opt', 'llama' or 't5', got {llm!r}")
    c = defaults.base_config()
    c.model = f"tiny-{llm}"
    c.model_overrides = dict(llm=dict(vocab_size=VOCAB[llm]), qformer=dict(has_text_input=True),
                             qformer_text_input=True)
    c.init = dict(checkpoint="", qformer_text="", random=("*",))
    defaults.tiny_stage2_training(c)
    c.data = defaults.synthetic_data(data_dir or "data", question_template="{}")
    c.data.train = dict(name="blip2_vqa/synthetic", split="train")
    tokenizers = "{data_dir}/tokenizers/synthetic/"
    c.text = dict(llm_tokenizer=tokenizers + llm, qformer_tokenizer=tokenizers + "qformer",
                  max_length=32)
    c.eval.evaluators = defaults.synthetic_evaluators("vqa", num_beams=3)
    return c
