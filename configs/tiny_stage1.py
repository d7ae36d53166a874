"""Stage 1 (ITC + ITM + ITG) with the tiny preset on the synthetic dataset: a fraction of a second
per step on a CPU. Build the data first: `python -m blip2_jax.data.build synthetic --data-dir data`.

    python train.py --config configs/tiny_stage1.py[:DATA_DIR] --workdir /tmp/tiny1
"""
from blip2_jax.train import defaults


def get_config(arg=None):
    c = defaults.base_config()
    c.model = "tiny-stage1"
    c.model_overrides = {}
    # Tiny and from scratch: every tower starts random (real configs name their sources).
    c.init = dict(random=("*",))
    c.frozen = ("vision/.*",)
    c.loss = dict(itc=1.0, itm=1.0, itg=1.0)
    c.optimizer.update(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5)
    c.total_steps = 40
    c.batch_size = 16
    c.log_every_steps = 10
    c.checkpoint_every_steps = 20
    c.data = defaults.synthetic_data(arg or "data")
    c.text = dict(qformer_tokenizer="{data_dir}/tokenizers/synthetic/qformer", max_length=32)
    c.eval.evaluators = defaults.synthetic_evaluators("retrieval", k=16)
    return c
