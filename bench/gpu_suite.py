"""The parts of `bench/gpu.sh`, one per process: each measures one thing and appends one JSON line
to the results file; `table` turns the lines into the suite's markdown table.

    python bench/gpu_suite.py PART [--results FILE]      # PART: see PARTS below

Parts (JAX and torch never share a process: they would fight over GPU memory):
  matmul        jax bf16 matmul peak: N×N×N (8192), 3 warm-ups, then 5 rounds of 10 timed
                products; the best round is the peak MFU is computed against.
  stage1        our jitted, donated train step (`train.trainer.Trainer`, what train.py runs) on
                the `blip2-pretrain-vit-g` preset: EVA ViT-g (39 layers) frozen in bf16, BERT-base
                Q-Former trainable (fp32 params, bf16 compute), ITC + ITM + ITG.
  stage2-jax    the same step on `blip2-opt-2.7b`: ViT-g and OPT-2.7B frozen in bf16, Q-Former,
                query tokens, ln_vision and the language projection trainable (fp32 params,
                bf16 compute), OPT LM loss.
  stage2-torch  HF `Blip2ForConditionalGeneration` built from the same config
                (`config.to_hf_dict`): bf16 weights, SDPA attention, ViT and OPT frozen
                (requires_grad False, eval mode: no dropout, as ours), Q-Former, query tokens,
                language projection and the ViT's post_layernorm (= our ln_vision) trainable in
                fp32 under torch.autocast(bfloat16), AdamW (fused on CUDA), same batch.
  beam-jax      `Blip2.generate(num_beams=5, max_new_tokens=30, min_new_tokens=30)` on the
                OPT-2.7B model, every tower bf16.
  beam-torch    HF `generate(num_beams=5, max_new_tokens=30, min_new_tokens=30)`, the same model
                built all-bf16 from the same config, SDPA.
  table         the markdown table of the results file.

All weights are random (no download is possible there), created on the device: ours by the
jitted `api.init_fn` in the towers' param dtypes, HF's by its own init under
`torch.device(...)` with dtype=bfloat16. A step is timed with a device sync after it
(`jax.block_until_ready` / `torch.cuda.synchronize`): median of --iters steps after 2 warm-ups;
compile and warm-up are reported separately. Inputs: random pixels, random tokens, no padding.

Knobs (environment; the defaults are the GPU sizes): GPU_SUITE_SMALL=1 (tiny presets, batch 2:
a CPU dry run), S1_BATCH (128), S2_BATCH (64), BEAM_BATCH (16), TEXT_LEN (32), NEW_TOKENS
(30), BEAMS (5), ITERS (10 timed train steps), BEAM_ITERS (3 timed generate calls), MATMUL_N
(8192), TORCH_DEVICE (cuda if torch sees one, else cpu), COMMIT (for the table).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
from blip2_jax.models import blip2 as blip2_model

SMALL = os.environ.get("GPU_SUITE_SMALL", "0") == "1"
WARMUP = 2                     # untimed train steps (the first one is reported)
TARGETS = {"stage1_mfu": 0.50, "stage2_ratio": 1.5, "beam_ratio": 3.0}
# Datasheet dense bf16 peaks (TFLOP/s), shown beside the measured one.
SPEC_PEAK = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def sizes() -> dict:
    if SMALL:
        d = dict(s1_preset="tiny-stage1", s2_preset="tiny-opt", s1_batch=2, s2_batch=2,
                 beam_batch=2, text_len=8, new_tokens=6, beams=5, iters=2, beam_iters=2,
                 matmul_n=256)
    else:
        d = dict(s1_preset="blip2-pretrain-vit-g", s2_preset="blip2-opt-2.7b", s1_batch=128,
                 s2_batch=64, beam_batch=16, text_len=32, new_tokens=30, beams=5, iters=10,
                 beam_iters=3, matmul_n=8192)
    for key, env in (("s1_batch", "S1_BATCH"), ("s2_batch", "S2_BATCH"),
                     ("beam_batch", "BEAM_BATCH"), ("text_len", "TEXT_LEN"),
                     ("new_tokens", "NEW_TOKENS"), ("beams", "BEAMS"), ("iters", "ITERS"),
                     ("beam_iters", "BEAM_ITERS"), ("matmul_n", "MATMUL_N")):
        d[key] = _env_int(env, d[key])
    return d


# ------------------------------------------------------------------------------------------------
# Shared set-up
# ------------------------------------------------------------------------------------------------
def model_config(stage: int):
    """Our config of the stage's model: every tower computes in bf16; frozen towers (ViT, LLM)
    store bf16; the trained Q-Former keeps float32 params (the Trainer holds trainables in
    float32 regardless)."""
    from blip2_jax.config import get_preset
    s = sizes()
    cfg = get_preset(s["s1_preset"] if stage == 1 else s["s2_preset"])
    if cfg.llm is not None and cfg.image_token_index is None:       # tiny presets: HF needs one
        cfg = cfg.replace(image_token_index=cfg.llm.vocab_size - 1)
    bf = "bfloat16"
    qformer = dataclasses.replace(cfg.qformer, dtype=bf)
    if os.environ.get("QFORMER_DROPOUT", "").strip():    # lever experiments (bench/gpu_levers.sh)
        p = float(os.environ["QFORMER_DROPOUT"])
        qformer = dataclasses.replace(qformer, hidden_dropout=p, attention_dropout=p)
    return cfg.replace(
        vision=dataclasses.replace(cfg.vision, dtype=bf, param_dtype=bf),
        qformer=qformer,
        llm=None if cfg.llm is None else dataclasses.replace(cfg.llm, dtype=bf, param_dtype=bf))


def optimizer_config() -> dict:
    """train.py's AdamW settings (`train.defaults.base_config().optimizer`: b1 0.9, b2 0.98,
    weight decay 0.05, no clipping). `defaults` needs ml_collections, which the GPU image lacks:
    then the same values, written out."""
    try:
        from blip2_jax.train import defaults
        return dict(defaults.base_config().optimizer)
    except ImportError:
        return dict(b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, clip_norm=0.0)


def make_batch(cfg, stage: int, batch: int, text_len: int) -> dict:
    """Host batch with the step's fields: random pixels (B, S, S, 3); random tokens, all valid
    (no padding); OPT rows start with BOS and never hold the image placeholder token."""
    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    image = rng.standard_normal((batch, s, s, 3), dtype=np.float32)
    mask = np.ones((batch, text_len), np.int32)
    out = {"image": image, "valid": np.ones(batch, bool)}
    if stage == 1:
        vocab = cfg.qformer.vocab_size
        lo = 1000 if vocab > 2000 else 3
        ids = rng.integers(lo, vocab - 1, size=(batch, text_len))   # vocab - 1 is [DEC]
        out.update(qformer_ids=ids.astype(np.int32), qformer_mask=mask)
        return out
    llm = cfg.llm
    lo = 1000 if llm.vocab_size > 2000 else 3
    ids = rng.integers(lo, llm.vocab_size, size=(batch, text_len))
    img = cfg.image_token_index
    if img is not None:
        ids[ids == img] = img - 1
    ids[:, 0] = llm.bos_token_id
    out.update(llm_ids=ids.astype(np.int32), llm_mask=mask)
    return out


def _jax_setup():
    import jax
    if not SMALL and jax.default_backend() == "cpu":
        raise RuntimeError("JAX runs on the CPU: the full-size suite needs a GPU "
                           "(GPU_SUITE_SMALL=1 is the CPU dry run)")
    return jax


def _jax_peak_memory():
    import jax
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:                                               # noqa: BLE001
        stats = {}
    v = stats.get("peak_bytes_in_use")
    return None if v is None else round(v / 2 ** 30, 2)


def _torch_setup():
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    name = os.environ.get("TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if not SMALL and dev.type != "cuda":
        raise RuntimeError("torch sees no CUDA device: the full-size suite needs a GPU "
                           "(GPU_SUITE_SMALL=1 is the CPU dry run)")
    torch.manual_seed(0)
    return torch, dev


def _sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _torch_peak_memory(dev):
    import torch
    if dev.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)


def _hf_model(cfg, dev):
    """HF Blip2ForConditionalGeneration of our config (random init on `dev`, bf16, SDPA)."""
    import torch
    import transformers
    from blip2_jax.config import to_hf_dict
    hf_cfg = transformers.Blip2Config.from_dict(to_hf_dict(cfg))
    with torch.device(dev):
        model = transformers.Blip2ForConditionalGeneration._from_config(
            hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model


def _timed(fn, sync, n: int) -> list:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _summary(times: list) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "n": len(times)}


def _n_params(tree) -> int:
    import jax
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------
def part_matmul(s: dict) -> dict:
    jax = _jax_setup()
    import jax.numpy as jnp
    n = s["matmul_n"]
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(ka, (n, n), jnp.bfloat16)
    y = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(jnp.matmul)
    t0 = time.perf_counter()
    f(x, y).block_until_ready()
    first = time.perf_counter() - t0
    for _ in range(3):
        f(x, y).block_until_ready()
    reps, rounds = 10, []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            z = f(x, y)
        z.block_until_ready()
        rounds.append((time.perf_counter() - t0) / reps)
    flop = 2.0 * n ** 3
    return {"n": n, "dtype": "bfloat16", "first_call_s": first,
            "median_ms": statistics.median(rounds) * 1e3, "best_ms": min(rounds) * 1e3,
            "tflops_median": flop / statistics.median(rounds) / 1e12,
            "peak_tflops": flop / min(rounds) / 1e12,
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__}


def _train_jax(s: dict, stage: int) -> dict:
    jax = _jax_setup()
    from blip2_jax import sharding
    from blip2_jax.losses import LossConfig
    from blip2_jax.train.trainer import CompiledStep, Trainer

    cfg = model_config(stage)
    b = s["s1_batch"] if stage == 1 else s["s2_batch"]
    t = s["text_len"]
    if stage == 1:
        lc, frozen = LossConfig(dec_token_id=cfg.qformer.vocab_size - 1), ("vision/.*",)
    else:
        lc, frozen = LossConfig(prompt_length=0), ("vision/.*", "llm/.*")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    trainer = Trainer(cfg, lc, optimizer_config(), total_steps=10_000, mesh=mesh, frozen=frozen,
                      frozen_dtype="bfloat16")
    t0 = time.perf_counter()
    params = blip2_model.init_fn(cfg)(jax.random.PRNGKey(0))
    state, frozen_tree = trainer.init(params, seed=0)
    del params
    jax.block_until_ready((state, frozen_tree))
    init_s = time.perf_counter() - t0
    host = make_batch(cfg, stage, b, t)
    batch = trainer.place(host)
    t0 = time.perf_counter()
    lowered = trainer.lower(state, frozen_tree, batch)
    t1 = time.perf_counter()
    compiled = CompiledStep(lowered.compile())
    t2 = time.perf_counter()
    holder = {"state": state}
    del state

    def step():
        holder["state"], holder["metrics"] = compiled(holder["state"], frozen_tree, batch)

    sync = lambda: jax.block_until_ready((holder["state"], holder["metrics"]))  # noqa: E731
    warm = _timed(step, sync, WARMUP)
    times = _timed(step, sync, s["iters"])
    m = {k: float(v) for k, v in holder["metrics"].items()}
    model_flops = trainer.model_flops(batch)
    med = statistics.median(times)
    return {"preset": s["s1_preset"] if stage == 1 else s["s2_preset"], "batch": b,
            "text_len": t, "queries": cfg.num_query_tokens, "image_size": cfg.vision.image_size,
            "dtypes": "frozen towers bf16 params + bf16 compute; trainable fp32 params, bf16 "
                      "compute",
            "trainable_params": _n_params(holder["state"].params),
            "frozen_params": _n_params(frozen_tree),
            "init_s": init_s, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "first_step_s": warm[0], "step": _summary(times),
            "steps_per_s": 1.0 / med, "images_per_s": b / med,
            "model_flops_per_step": model_flops, "tflops": model_flops / med / 1e12,
            "xla_cost_flops": compiled.flops_per_step,
            "loss": m.get("loss"), "finite": bool(m.get("finite", 1.0)),
            "losses": {k: m[k] for k in ("itc", "itm", "itg", "lm") if k in m},
            "peak_memory_gib": _jax_peak_memory(),
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend()}


def part_stage1(s: dict) -> dict:
    return _train_jax(s, 1)


def part_stage2_jax(s: dict) -> dict:
    return _train_jax(s, 2)


def part_stage2_torch(s: dict) -> dict:
    torch, dev = _torch_setup()
    cfg = model_config(2)
    b, t, q = s["s2_batch"], s["text_len"], cfg.num_query_tokens
    t0 = time.perf_counter()
    model = _hf_model(cfg, dev)
    model.requires_grad_(False)
    # Trainable as ours: Q-Former, query tokens, language projection, ln_vision (HF's
    # post_layernorm), fp32 master weights.
    trainable_modules = (model.qformer, model.language_projection,
                         model.vision_model.post_layernorm)
    for mod in trainable_modules:
        mod.float().requires_grad_(True)
    model.query_tokens.data = model.query_tokens.data.float()
    model.query_tokens.requires_grad_(True)
    # Dropout where ours has it: the Q-Former (train mode); the frozen towers in eval mode.
    model.train()
    model.vision_model.eval()
    model.language_model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not (p.ndim == 1 or n.endswith("bias"))]
    no_decay = [p for n, p in named if p.ndim == 1 or n.endswith("bias")]
    o = optimizer_config()
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.get("weight_decay", 0.0)},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.get("lr", 1e-4), betas=(o.get("b1", 0.9), o.get("b2", 0.98)),
                            eps=o.get("eps", 1e-8), fused=dev.type == "cuda")
    _sync(dev)
    build_s = time.perf_counter() - t0

    host = make_batch(cfg, 2, b, t)
    pix = torch.from_numpy(host["image"].transpose(0, 3, 1, 2).copy()).to(dev, torch.bfloat16)
    ids = torch.from_numpy(host["llm_ids"].astype(np.int64)).to(dev)
    mask = torch.from_numpy(host["llm_mask"].astype(np.int64)).to(dev)
    img = torch.full((b, q), cfg.image_token_index, dtype=torch.long, device=dev)
    input_ids = torch.cat([img, ids], 1)                     # [32 image placeholders; text]
    attention_mask = torch.cat([torch.ones_like(img), mask], 1)
    # Logits of the last query and the text only (as ours: HF's `logits_to_keep`), labels
    # aligned with them; the last query predicts BOS. HF shifts the labels itself.
    text_labels = torch.where(mask > 0, ids, -100)
    ignore = lambda n: torch.full((b, n), -100, dtype=torch.long, device=dev)  # noqa: E731
    holder = {"kw": dict(labels=torch.cat([ignore(1), text_labels], 1), logits_to_keep=t + 1)}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            out = model(pixel_values=pix, input_ids=input_ids, attention_mask=attention_mask,
                        **holder["kw"])
        out.loss.backward()
        opt.step()
        holder["loss"] = out.loss.detach()

    sync = lambda: _sync(dev)                                   # noqa: E731
    hf_logits = ""
    try:
        first = _timed(step, sync, 1)
    except TypeError as e:          # a transformers whose forward does not pass logits_to_keep on
        if "logits_to_keep" not in str(e):
            raise
        hf_logits = "HF computes logits at every position (no logits_to_keep in this version)"
        print(f"note: {hf_logits}: {e}", flush=True)
        holder["kw"] = dict(labels=torch.cat([ignore(q), text_labels], 1))
        first = _timed(step, sync, 1)
    warm = first + _timed(step, sync, WARMUP - 1)
    times = _timed(step, sync, s["iters"])
    from blip2_jax.train import flops as flops_lib
    from blip2_jax.losses import LossConfig
    model_flops = flops_lib.train_step_flops_for_batch(cfg, LossConfig(), host)
    med = statistics.median(times)
    loss = float(holder["loss"])
    return {"preset": s["s2_preset"], "batch": b, "text_len": t,
            "trainable_params": int(sum(p.numel() for _, p in named)),
            "frozen_params": int(sum(p.numel() for p in model.parameters()
                                     if not p.requires_grad)),
            "build_s": build_s, "first_step_s": warm[0], "step": _summary(times),
            "steps_per_s": 1.0 / med, "images_per_s": b / med,
            "model_flops_per_step": model_flops, "tflops": model_flops / med / 1e12,
            "loss": loss, "finite": bool(np.isfinite(loss)),
            "hf_logits": hf_logits, "queries": q,
            "peak_memory_gib": _torch_peak_memory(dev), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}


def part_beam_jax(s: dict) -> dict:
    jax = _jax_setup()
    from blip2_jax import api
    cfg = model_config(2).with_dtypes("bfloat16")
    b, n = s["beam_batch"], s["new_tokens"]
    t0 = time.perf_counter()
    model = api.Blip2(cfg, blip2_model.init_fn(cfg)(jax.random.PRNGKey(0)), check=False)
    jax.block_until_ready(model.params)
    init_s = time.perf_counter() - t0
    pix = jax.device_put(make_batch(cfg, 2, b, 1)["image"])
    gen = dict(num_beams=s["beams"], max_new_tokens=n, min_new_tokens=n)
    holder = {}

    def run():
        holder["out"] = model.generate(pix, **gen)              # numpy: synced

    first = _timed(run, lambda: None, 1)[0]
    warm = _timed(run, lambda: None, 1)[0]
    times = _timed(run, lambda: None, s["beam_iters"])
    med = statistics.median(times)
    out = np.asarray(holder["out"])
    return {"preset": s["s2_preset"], "batch": b, "num_beams": s["beams"], "new_tokens": n,
            "generated_shape": list(out.shape), "dtypes": "every tower bf16",
            "init_s": init_s, "first_call_s": first, "compile_s": first - med,
            "second_call_s": warm, "call": _summary(times), "images_per_s": b / med,
            "peak_memory_gib": _jax_peak_memory(), "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend()}


def part_beam_torch(s: dict) -> dict:
    torch, dev = _torch_setup()
    cfg = model_config(2).with_dtypes("bfloat16")
    b, n = s["beam_batch"], s["new_tokens"]
    t0 = time.perf_counter()
    model = _hf_model(cfg, dev).eval()
    _sync(dev)
    build_s = time.perf_counter() - t0
    pix = torch.from_numpy(make_batch(cfg, 2, b, 1)["image"].transpose(0, 3, 1, 2).copy()
                           ).to(dev, torch.bfloat16)
    gen = dict(num_beams=s["beams"], max_new_tokens=n, min_new_tokens=n, do_sample=False)
    holder = {}

    def run():
        with torch.inference_mode():
            holder["out"] = model.generate(pixel_values=pix, **gen)

    sync = lambda: _sync(dev)                                   # noqa: E731
    first = _timed(run, sync, 1)[0]
    times = _timed(run, sync, s["beam_iters"])
    med = statistics.median(times)
    out = holder["out"]
    prompt = cfg.num_query_tokens + 1                  # image placeholders + BOS come back too
    return {"preset": s["s2_preset"], "batch": b, "num_beams": s["beams"], "new_tokens": n,
            "generated_shape": [int(out.shape[0]), int(out.shape[1]) - prompt],
            "dtypes": "every tower bf16", "build_s": build_s, "first_call_s": first,
            "call": _summary(times), "images_per_s": b / med,
            "peak_memory_gib": _torch_peak_memory(dev), "device": str(dev),
            "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
def _read(path: str) -> tuple[dict, dict]:
    parts, runs = {}, {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if "run" in r:
                    runs[r["run"]] = r
                elif "part" in r:
                    parts[r["part"]] = r
    return parts, runs


def _version(dist: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return "; ".join(line.strip() for line in out.stdout.strip().splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    return ""


def _commit() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=_ROOT)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _spec_peak(name: str):
    for key, v in SPEC_PEAK.items():
        if key in name:
            return key, v
    return None, None


def _f(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)


def _g(x) -> str:
    """3 significant digits, no exponent for the sizes this table sees."""
    if x is None:
        return "—"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{max(0, 2 - int(np.floor(np.log10(abs(x)))))}f}"


def table(path: str) -> str:
    parts, runs = _read(path)
    s = sizes()

    def status(name):
        """'' when the part produced figures, else why not."""
        p = parts.get(name)
        if p is not None and "error" not in p:
            return ""
        if p is not None:
            return f"FAILED: {p['error']}"
        r = runs.get(name)
        if r is None:
            return "not run"
        if r.get("skipped"):
            return f"skipped ({r['skipped']})"
        if r.get("rc") in (124, 137):
            return f"TIMED OUT after {r.get('limit_s')} s"
        return f"FAILED (exit {r.get('rc')}, see the log)"

    mm = parts.get("matmul", {})
    peak = mm.get("peak_tflops") if not status("matmul") else None
    gpu = _gpu_name() or mm.get("device") or parts.get("stage1", {}).get("device") or "?"
    backend = next((p.get("backend") for p in parts.values() if p.get("backend")), "?")
    spec_name, spec = _spec_peak(gpu)
    wall = sum(r.get("wall_s", 0) for r in runs.values())
    lines = [
        f"## blip2-jax GPU suite ({'SMALL dry run: tiny presets' if SMALL else 'full size'})",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} · GPU: {gpu} · "
        f"jax {_version('jax')} (jaxlib {_version('jaxlib')}, backend {backend}) · "
        f"flax {_version('flax')} · torch {_version('torch')} · "
        f"transformers {_version('transformers')} · python {platform.python_version()} · "
        f"commit {_commit()} · parts' wall time {wall} s",
        "",
        "| # | measurement | setting | blip2-jax (ours) | HF PyTorch | ours / HF | target | "
        "verdict | init / compile / warm-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def mfu(tflops):
        return None if peak is None or tflops is None else tflops / peak

    def train_cell(p):
        st = p["step"]["median_s"]
        cell = (f"**{_g(st * 1e3)} ms/step** · {_g(p['steps_per_s'])} steps/s · "
                f"{_g(p['images_per_s'])} img/s · {_g(p['tflops'])} TFLOP/s")
        m = mfu(p["tflops"])
        if m is not None:
            cell += f" · MFU {100 * m:.1f} %"
        if not p.get("finite", True):
            cell += " · NON-FINITE LOSS"
        return cell

    # 1. matmul
    err = status("matmul")
    cell = err or f"**{_g(peak)} TFLOP/s** (median round {_g(mm['tflops_median'])})"
    first = _f(mm.get("first_call_s"), "{:.2f}")
    lines.append(f"| 1 | bf16 matmul peak | {s['matmul_n']}³ bf16, jax.jit, best of 5 rounds × "
                 f"10 | {cell} | — | — | — | — | compile + 1st call {first} s |")

    # 2. stage 1
    p1 = parts.get("stage1", {})
    err = status("stage1")
    if err:
        ours, verdict = err, "—"
    else:
        ours = train_cell(p1)
        m = mfu(p1["tflops"])
        verdict = "—" if m is None else ("met" if m >= TARGETS["stage1_mfu"] else "**not met**")
    setting = (f"`{s['s1_preset']}` ITC+ITM+ITG, B={s['s1_batch']}, text {s['text_len']}, "
               "ViT frozen bf16, Q-Former fp32 params / bf16 compute")
    comp = ("—" if err else f"init {p1['init_s']:.0f} s, lower {p1['lower_s']:.0f} s, "
            f"compile {p1['compile_s']:.0f} s, 1st step {p1['first_step_s']:.2f} s")
    lines.append(f"| 2 | stage-1 train step | {setting} | {ours} | — | — | "
                 f"MFU ≥ {100 * TARGETS['stage1_mfu']:.0f} % | {verdict} | {comp} |")

    # 3. stage 2
    pj, pt = parts.get("stage2-jax", {}), parts.get("stage2-torch", {})
    ej, et = status("stage2-jax"), status("stage2-torch")
    ours = ej or train_cell(pj)
    theirs = et or train_cell(pt)
    ratio = verdict = "—"
    if not ej and not et:
        r = pt["step"]["median_s"] / pj["step"]["median_s"]
        ratio = f"**{r:.2f}×**"
        verdict = "met" if r >= TARGETS["stage2_ratio"] else "**not met**"
    q = model_config(2).num_query_tokens
    setting = (f"`{s['s2_preset']}` LM loss, B={s['s2_batch']}, text {s['text_len']} (+{q} "
               "queries), ViT+OPT frozen bf16, Q-Former+proj fp32 / bf16 compute; HF: SDPA, "
               "autocast bf16, fused AdamW")
    comp = []
    if not ej:
        comp.append(f"ours: init {pj['init_s']:.0f} s, lower {pj['lower_s']:.0f} s, compile "
                    f"{pj['compile_s']:.0f} s, 1st step {pj['first_step_s']:.2f} s")
    if not et:
        comp.append(f"HF: build {pt['build_s']:.0f} s, 1st step {pt['first_step_s']:.2f} s")
    lines.append(f"| 3 | stage-2 train step | {setting} | {ours} | {theirs} | {ratio} | "
                 f"≥ {TARGETS['stage2_ratio']}× | {verdict} | {'; '.join(comp) or '—'} |")

    # 4. beam search
    bj, bt = parts.get("beam-jax", {}), parts.get("beam-torch", {})
    ej, et = status("beam-jax"), status("beam-torch")

    def beam_cell(p):
        return (f"**{_g(p['images_per_s'])} img/s** ({_g(p['call']['median_s'] * 1e3)} "
                f"ms/batch, {p['generated_shape'][1]} new tokens)")
    ours, theirs = ej or beam_cell(bj), et or beam_cell(bt)
    ratio = verdict = "—"
    if not ej and not et:
        r = bj["images_per_s"] / bt["images_per_s"]
        ratio = f"**{r:.2f}×**"
        verdict = "met" if r >= TARGETS["beam_ratio"] else "**not met**"
    setting = (f"`{s['s2_preset']}` all bf16, B={s['beam_batch']}, beam {s['beams']}, "
               f"{s['new_tokens']} new tokens (min = max); HF: SDPA, generate()")
    comp = []
    if not ej:
        comp.append(f"ours: init {bj['init_s']:.0f} s, 1st call {bj['first_call_s']:.1f} s "
                    f"(compile ≈ {bj['compile_s']:.1f} s)")
    if not et:
        comp.append(f"HF: build {bt['build_s']:.0f} s, 1st call {bt['first_call_s']:.2f} s")
    lines.append(f"| 4 | beam-5 captioning | {setting} | {ours} | {theirs} | {ratio} | "
                 f"≥ {TARGETS['beam_ratio']}× | {verdict} | {'; '.join(comp) or '—'} |")

    notes = [
        "",
        "- Steady state: median of the timed steps/calls after the warm-ups, each followed by a "
        "device sync; images/s = batch / median. Ratio = HF time / our time (> 1: ours faster).",
        "- Model FLOPs per step (`blip2_jax.train.flops.train_step_flops_for_batch`, the "
        "analytic matmul count train.py logs MFU with): frozen ViT forward ×1, trainable "
        "matmuls ×3, frozen OPT weight matmuls ×2 and attention ×3 (activation gradients "
        "flow through it). The HF row uses the same count for the same work. MFU = model "
        "FLOPs / step time / the measured matmul peak of row 1.",
    ]
    if spec:
        notes.append(f"- Datasheet dense bf16 peak of the {spec_name}: {spec} TFLOP/s; the "
                     f"measured peak is {_f(peak)} TFLOP/s.")
    for name, label in (("stage1", "stage 1"), ("stage2-jax", "stage 2 ours"),
                        ("stage2-torch", "stage 2 HF")):
        p = parts.get(name)
        if p and "error" not in p:
            notes.append(f"- {label}: {_g(p['model_flops_per_step'] / 1e12)} model TFLOP/step, "
                         f"trainable {_g(p['trainable_params'] / 1e6)} M / frozen "
                         f"{_g(p['frozen_params'] / 1e6)} M params, loss {p['loss']:.3f}, step "
                         f"min/max {_g(p['step']['min_s'] * 1e3)}/{_g(p['step']['max_s'] * 1e3)}"
                         f" ms, peak memory {_f(p.get('peak_memory_gib'))} GiB"
                         + (f"; {p['hf_logits']}" if p.get("hf_logits") else ""))
    for name in ("beam-jax", "beam-torch"):
        p = parts.get(name)
        if p and "error" not in p:
            notes.append(f"- {name}: new tokens {p['generated_shape']}, call min/max "
                         f"{_g(p['call']['min_s'] * 1e3)}/{_g(p['call']['max_s'] * 1e3)} ms, "
                         f"peak memory {_f(p.get('peak_memory_gib'))} GiB")
    return "\n".join(lines + notes)


# ------------------------------------------------------------------------------------------------
PARTS = {"matmul": part_matmul, "stage1": part_stage1, "stage2-jax": part_stage2_jax,
         "stage2-torch": part_stage2_torch, "beam-jax": part_beam_jax,
         "beam-torch": part_beam_torch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=sorted(PARTS) + ["table"])
    ap.add_argument("--results", default=os.path.join(
        os.environ.get("OUT") or os.path.join(_ROOT, "bench"), "gpu_results.jsonl"))
    a = ap.parse_args(argv)
    if a.part == "table":
        print(table(a.results))
        return 0
    s = sizes()
    print(f"[{a.part}] sizes: {json.dumps(s)}", flush=True)
    t0 = time.perf_counter()
    try:
        rec = {"part": a.part, **PARTS[a.part](s)}
        rc = 0
    except Exception as e:                                          # noqa: BLE001
        traceback.print_exc()
        rec = {"part": a.part, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
               if str(e) else type(e).__name__}
        rc = 1
    rec["wall_s"] = time.perf_counter() - t0
    rec["small"] = SMALL
    line = json.dumps(rec, default=str)
    print(f"[{a.part}] {line}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    with open(a.results, "a") as f:
        f.write(line + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
