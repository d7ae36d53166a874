"""Stage 2 with the tiny preset on the synthetic dataset: `:opt` (default), `:llama` or `:t5` LLM.
The frozen LLM is the config's own tiny one (random here; the demo pre-trains one).

    python train.py --config configs/tiny_stage2.py[:opt|llama|t5[,DATA_DIR]] --workdir /tmp/tiny2
"""
from blip2_jax.train import defaults


def get_config(arg=None):
    llm, _, data_dir = (arg or "opt").partition(",")
    if llm not in ("opt", "llama", "t5"):
        raise ValueError(f"tiny_stage2 takes 'opt', 'llama' or 't5', got {llm!r}")
    c = defaults.base_config()
    c.model = f"tiny-{llm}"
    # The synthetic language's tokenizers (blip2_jax.data.build synthetic) set the vocabularies.
    c.model_overrides = dict(llm=dict(vocab_size=256 if llm == "t5" else 384))
    c.init = dict(random=("*",))
    defaults.tiny_stage2_training(c)
    c.data = defaults.synthetic_data(data_dir or "data")
    c.text = dict(llm_tokenizer="{data_dir}/tokenizers/synthetic/" + llm, max_length=32)
    c.eval.evaluators = defaults.synthetic_evaluators("caption", "vqa", num_beams=3,
                                                      max_new_tokens=12)
    return c
