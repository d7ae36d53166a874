"""The training run behind `train.py`: config → mesh, data, parameters, trainer, checkpoints →
steps, with metrics, resumption, preemption and a final export.

`WORKDIR/` holds:
- `checkpoints/`: orbax; see `blip2_jax.checkpoint`;
- `metrics.jsonl`: one JSON object per logged step;
- `tb/`: TensorBoard events;
- `config.json`: the resolved config;
- `final/`: at the end of the run, the whole model in our native format (`blip2_jax.load`
  reads it; a stage-2 config names it in `init.stage1`).

Re-running the same command resumes from the latest checkpoint; SIGTERM saves one and exits.
`stop_after_steps` ends the run at that step as a preemption would, while the schedule still
follows `total_steps`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Mapping, Optional

import jax
import numpy as np

from blip2_jax import api, checkpoint as ckpt_lib, config as config_lib, processing
from blip2_jax import sharding as sharding_lib
from blip2_jax.data import features, pipeline
from blip2_jax.train import init as init_lib
from blip2_jax.train import state as state_lib
from blip2_jax.train.metrics import MetricWriter
from blip2_jax.train.step import LossConfig
from blip2_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def _plain(x):
    """ml_collections / nested containers → plain Python (dicts, lists, scalars)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def trainer_options(config) -> dict:
    """The Trainer's keyword arguments a run config sets: frozen towers, their dtype and
    microbatches."""
    return dict(frozen=tuple(config.get("frozen") or ()),
                frozen_dtype=config.get("frozen_dtype") or None,
                microbatches=int(config.get("microbatches") or 1))


def model_config(config) -> config_lib.Blip2Config:
    """`config.model`: a preset name, or a checkpoint dir (native or HF); then
    `config.model_overrides` (nested dict of config fields) applied on top."""
    name = config.model
    if os.path.isdir(str(name)):
        from blip2_jax.convert import native
        cfg = (native.read_config(name) if native.is_native(name)
               else config_lib.read_hf_config(name))
    else:
        cfg = config_lib.get_preset(name)
    overrides = _plain(config.get("model_overrides") or {})
    if overrides:
        d = cfg.to_dict()

        def update(dst, src, where):
            for k, v in src.items():
                if k not in dst:
                    raise KeyError(f"config.model_overrides: {where}{k} is not a model config "
                                   f"field (have {sorted(dst)})")
                if isinstance(v, Mapping):
                    update(dst[k], v, f"{where}{k}.")
                else:
                    dst[k] = v
        update(d, overrides, "")
        cfg = config_lib.Blip2Config.from_dict(d)
    return cfg


def text_setup(config, cfg: config_lib.Blip2Config) -> tuple[list, LossConfig, bool]:
    """(TextSpecs for the pipeline, the LossConfig, prefix_lm) of the stage. Tokenizer paths may
    say "{data_dir}" (config.data.data_dir)."""
    data_dir = _plain(config.data).get("data_dir", "")
    text = {k: v.format(data_dir=data_dir) if isinstance(v, str) else v
            for k, v in _plain(config.text).items()}
    max_length = int(text.get("max_length", 32))
    lw = _plain(config.get("loss") or {})
    if cfg.llm is None:
        tok_dir = text["qformer_tokenizer"]
        tok = processing.load_tokenizer(tok_dir, "qformer")
        specs = [pipeline.TextSpec("qformer", tok_dir, "qformer", max_length)]
        return specs, LossConfig(dec_token_id=int(tok.bos_token_id), **lw), False
    tok_dir = text["llm_tokenizer"]
    kind = cfg.llm_kind
    prompt = _plain(config.data).get("prompt", "")
    if kind == "opt":
        tok = processing.load_tokenizer(tok_dir, "opt")
        # LAVIS: prompt_length = BOS + the model prompt's tokens ("a photo of", without the
        # space its text processor adds before the caption), masked only when a prompt is set.
        prompt_length = (1 + len(tok(prompt.rstrip(), add_special_tokens=False)["input_ids"])
                         if prompt else 0)
        specs = [pipeline.TextSpec("llm", tok_dir, "opt", max_length, suffix="\n")]
        return specs, LossConfig(prompt_length=prompt_length, **lw), False
    specs = [pipeline.TextSpec("llm", tok_dir, "t5", max_length),
             pipeline.TextSpec("target", tok_dir, "t5", max_length, field="target")]
    return specs, LossConfig(**lw), True


def with_caption_eos(config, cfg: config_lib.Blip2Config) -> config_lib.Blip2Config:
    """BLIP-2 OPT ends every training caption with "\\n" and generates up to it: the model's
    EOS becomes the "\\n" token (LAVIS `eos_token_id`, HF blip2-opt's text_config 50118), so
    the exported checkpoint captions as trained."""
    if cfg.llm is None or cfg.llm_kind != "opt":
        return cfg
    tok_dir = tokenizer_paths(config)["llm"]
    ids = processing.load_tokenizer(tok_dir, "opt")("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the OPT tokenizer at {tok_dir} splits '\\n' into {ids}; BLIP-2 OPT "
                         "needs it as one token (its caption EOS)")
    return cfg.replace(llm=dataclasses.replace(cfg.llm, eos_token_id=int(ids[0])))


def tokenizer_paths(config) -> dict:
    """{"llm": dir or None, "qformer": dir or None} from config.text ("{data_dir}" expanded)."""
    data_dir = _plain(config.get("data") or {}).get("data_dir", "")
    text = _plain(config.get("text") or {})
    return {k: (text[f"{k}_tokenizer"].format(data_dir=data_dir)
                if text.get(f"{k}_tokenizer") else None) for k in ("llm", "qformer")}


def evaluators(config, *, batch_size: Optional[int] = None):
    """(evaluators of config.eval, their Tokenizers loaded from config.text) — ([], None) when
    the config names none."""
    from blip2_jax.eval import evaluators as eval_lib
    eval_cfg = _plain(config.get("eval") or {})
    if not eval_cfg.get("evaluators"):
        return [], None
    data_dir = _plain(config.get("data") or {}).get("data_dir")
    evs = eval_lib.from_config(eval_cfg, data_dir=data_dir, batch_size=batch_size)
    paths = tokenizer_paths(config)
    need = {ev.needs()[1] for ev in evs}
    toks = {k: processing.load_tokenizer(paths[k], k) for k in ("llm", "qformer")
            if k in need and paths[k]}
    return evs, eval_lib.Tokenizers(**toks)


def check_batch(config, mesh) -> int:
    """The step's global batch. config.batch_size must split evenly over the mesh's batch axes:
    otherwise it would be replicated (every device computing every example), which no one wants
    in training. With config.pad_batch it is rounded up to the next multiple instead: the extra
    rows are padding (valid False) that the losses leave out (train/step.py `masked_rows`)."""
    n = sharding_lib.batch_shards(mesh)
    b = int(config.batch_size)
    if b % n == 0:
        return b
    if config.get("pad_batch"):
        return n * -(-b // n)
    axes = sharding_lib.batch_axes(mesh)
    raise ValueError(f"config.batch_size {b} is not divisible by the mesh's batch axes "
                     f"{axes} ({n} ways, mesh {dict(mesh.shape)}): use a mesh whose data x fsdp "
                     f"divides it (e.g. config.mesh.tensor > 1), another batch size, or "
                     f"config.pad_batch=True (steps of {n * -(-b // n)} rows, the extra "
                     f"{n * -(-b // n) - b} padding that the losses leave out)")


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict:
    """A host batch padded with zero rows (valid False) to `rows` rows."""
    n = len(batch["valid"])
    if n == rows:
        return dict(batch)
    return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def make_mesh(config, devices=None):
    m = _plain(config.mesh)
    axes = {k: int(m.get(k, 1 if k != "data" else -1)) for k in ("data", "fsdp", "tensor")}
    dcn = {k[4:]: int(v) for k, v in m.items() if k.startswith("dcn_") and int(v) != 1}
    unknown = set(m) - set(axes) - {f"dcn_{k}" for k in axes}
    if unknown:
        raise KeyError(f"unknown config.mesh keys {sorted(unknown)}")
    return sharding_lib.make_mesh(axes, dcn=dcn or None, devices=devices)


def _export(path: str, cfg: config_lib.Blip2Config, params, frozen_dtype: Optional[str],
            frozen_towers: set):
    """The whole model, native format; frozen towers keep their stored dtype (the config says
    so), trained ones are float32."""
    from jax.experimental import multihost_utils
    host = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    if jax.process_index() != 0:
        return
    if frozen_dtype:
        if "vision" in frozen_towers:
            cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, param_dtype=frozen_dtype))
        if "llm" in frozen_towers and cfg.llm is not None:
            cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, param_dtype=frozen_dtype))
    api.Blip2(cfg, host, check=False).save(path, format="native")


def run(config, workdir: str) -> dict:
    """Train (or resume) to `total_steps` (or `stop_after_steps`); returns the last metrics."""
    os.makedirs(workdir, exist_ok=True)
    cfg = model_config(config)
    total = int(config.total_steps)
    stop_at = int(config.get("stop_after_steps") or 0) or total
    mesh = make_mesh(config)
    step_batch = check_batch(config, mesh)
    texts, loss_cfg, prefix_lm = text_setup(config, cfg)
    loss_cfg = dataclasses.replace(loss_cfg, masked_rows=step_batch != int(config.batch_size))
    cfg = with_caption_eos(config, cfg)
    data_cfg = {**_plain(config.data), "texts": [dataclasses.asdict(t) for t in texts]}
    data_cfg.setdefault("image_size", cfg.vision.image_size)
    if prefix_lm:
        data_cfg["prefix_lm"] = True
    eval_every = int(_plain(config.get("eval") or {}).get("every_steps") or 0)
    evs, eval_tokenizers = evaluators(config) if eval_every > 0 else ([], None)
    if jax.process_count() > 1 and any(ev.kind == "retrieval" for ev in evs):
        raise ValueError("config.eval: retrieval evaluators run in one process; drop them from "
                         "in-training evaluation of a multi-host run (eval.py runs them after)")
    frozen_dtype = config.get("frozen_dtype") or None
    trainer = Trainer(cfg, loss_cfg, _plain(config.optimizer), total_steps=total, mesh=mesh,
                      skip_nonfinite=config.get("on_nonfinite", "stop") == "skip",
                      **trainer_options(config))

    params, sources = init_lib.initial_params(cfg, _plain(config.init), int(config.seed))
    frozen_tops = sorted({p.split("/")[0] for p in trainer.frozen_paths})
    frozen_host, frozen_meta = _frozen_towers(trainer, params, sources, frozen_dtype)
    if data_cfg.get("features"):
        _feature_caches(config, cfg, trainer, frozen_host, frozen_meta)
    del frozen_host
    data = pipeline.from_config(data_cfg, batch_size=int(config.batch_size),
                                seed=int(config.seed))
    features.check_vision(data.caches, frozen_meta.get("vision", {}).get("sha256"))
    state, frozen = trainer.init(params, seed=int(config.seed))
    del params

    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.get("keep_checkpoints", 3),
        save_interval_steps=int(config.checkpoint_every_steps))
    it = iter(data.dataset())
    meta = {"config": _plain(config), "model": cfg.to_dict(), "frozen": frozen_meta,
            "sources": sources}
    if checkpointer.latest_step() is not None:
        state, saved = checkpointer.restore(trainer.abstract_state(), it)
        ckpt_lib.check_frozen(saved["frozen"], frozen_meta)
        log.info("resumed from step %d", int(state.step))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(meta, f, indent=2, default=str)

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    preempted = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
    step = int(state.step)
    last: dict = {}
    eval_model = None
    local_rows = step_batch // jax.process_count()

    def next_batch():
        return trainer.place(pad_rows(pipeline.numeric(next(it)), local_rows))
    try:
        batch = next_batch()
        compiled = trainer.compile(state, frozen, batch)
        # The model's FLOPs for the real rows (padding is not useful work).
        flops = trainer.model_flops(batch) * int(config.batch_size) / step_batch
        bar = _progress(step, stop_at)
        t_window, n_window = time.perf_counter(), 0
        while step < stop_at:
            state, metrics = compiled(state, frozen, batch)
            step += 1
            n_window += 1
            if not bool(metrics["finite"]):
                if config.get("on_nonfinite", "stop") == "stop":
                    vals = {k: float(v) for k, v in metrics.items()}
                    raise NonFiniteLoss(f"non-finite loss at step {step}: {vals}; the last "
                                        f"checkpoint is step {checkpointer.latest_step()}")
                log.warning("step %d: non-finite loss, update skipped", step)
            if step % int(config.log_every_steps) == 0 or step in (1, stop_at):
                dt = time.perf_counter() - t_window
                last = {k: float(v) for k, v in metrics.items()}
                last.update(_throughput(n_window, dt, int(config.batch_size), flops,
                                        config.get("peak_tflops_per_device")))
                last["data_skipped"] = pipeline.skipped(it)[0]
                writer.write(step, last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                t_window, n_window = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            # Saved before the next batch is drawn, so the iterator state resumes with it.
            done = preempted["flag"] or step == stop_at
            checkpointer.save(step, state, it, meta, force=done)
            if evs and not preempted["flag"] and (step % eval_every == 0 or step == total):
                eval_model = _evaluate(evs, eval_tokenizers, cfg, state, frozen, mesh, workdir,
                                       step, writer, eval_model)
                t_window, n_window = time.perf_counter(), 0     # eval time is not step time
            if done:
                break
            batch = next_batch()
    finally:
        signal.signal(signal.SIGTERM, previous)
        checkpointer.close()
        writer.close()
    if step == total:
        _export(os.path.join(workdir, "final"), cfg,
                state_lib.merge(state.params, frozen), frozen_dtype, set(frozen_tops))
    return {"step": step, "preempted": preempted["flag"], **last}


def _feature_caches(config, cfg, trainer: Trainer, frozen_host, frozen_meta) -> None:
    """config.data.features: computes the caches the run lacks (data/features.py) with the
    run's own frozen ViT; one that exists is checked, never replaced."""
    features.require_frozen_vision(not trainer.loss_cfg.train_vision and "vision" in frozen_meta,
                                   tuple(config.get("frozen") or ()))
    n = jax.local_device_count()
    batch = n * -(-min(int(config.batch_size), 256) // n)
    features.build_with(config, cfg, frozen_host["vision"], frozen_meta["vision"]["sha256"],
                        frozen_meta["vision"]["source"], batch_size=batch, log=log.info)


def _frozen_towers(trainer: Trainer, params, sources: Mapping, frozen_dtype: Optional[str]):
    """(frozen sub-tree on the host in frozen_dtype, {tower: {source, sha256}}): what a
    checkpoint records of the towers it does not store."""
    _, frozen_host = state_lib.split(params, trainer.frozen_paths)
    if frozen_dtype:
        frozen_host = jax.tree.map(lambda x: np.asarray(x).astype(frozen_dtype), frozen_host)
    meta = {t: {"source": sources.get(t, "?"), "sha256": ckpt_lib.tree_hash(frozen_host[t])}
            for t in sorted(frozen_host)}
    return frozen_host, meta


def load_trained(config, workdir: str) -> tuple[api.Blip2, dict]:
    """The model a train.py run in `workdir` has trained, and {"source", "step"}: its `final/`
    export when the run finished; else its latest checkpoint's trainable parameters with the
    frozen towers reloaded from config.init (refused if they differ from the recorded hashes)."""
    final = os.path.join(workdir, "final")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    total = int(config.total_steps)
    checkpointer = (ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None)
                    if os.path.isdir(ckpt_dir) else None)
    try:
        latest = checkpointer.latest_step() if checkpointer is not None else None
        if os.path.isdir(final) and (latest is None or latest >= total):
            return api.load(final, dtype=None), {"source": final, "step": latest or total}
        if latest is None:
            raise FileNotFoundError(f"{workdir} holds neither a final/ export nor checkpoints/ "
                                    "(is it a train.py workdir?)")
        cfg = model_config(config)
        _, loss_cfg, _ = text_setup(config, cfg)
        cfg = with_caption_eos(config, cfg)
        frozen_dtype = config.get("frozen_dtype") or None
        trainer = Trainer(cfg, loss_cfg, _plain(config.optimizer), total_steps=total,
                          mesh=make_mesh(config), **trainer_options(config))
        params, sources = init_lib.initial_params(cfg, _plain(config.init), int(config.seed))
        frozen_host, frozen_meta = _frozen_towers(trainer, params, sources, frozen_dtype)
        del params
        state, saved = checkpointer.restore(trainer.abstract_state())
        ckpt_lib.check_frozen(saved["frozen"], frozen_meta)
        trained = jax.tree.map(sharding_lib.to_host, state.params)
        model = api.Blip2(cfg, state_lib.merge(trained, frozen_host), check=False)
        return model, {"source": os.path.join(ckpt_dir, str(latest)), "step": latest}
    finally:
        if checkpointer is not None:
            checkpointer.close()


def _evaluate(evs, tokenizers, cfg, state, frozen, mesh, workdir: str, step: int,
              writer: MetricWriter, model: Optional[api.Blip2] = None) -> api.Blip2:
    """config.eval's evaluators on the current parameters: metrics logged as
    `eval/NAME/METRIC` at this step, results and predictions in WORKDIR/eval/step_N/. Returns
    the model, to be passed back next time: its compiled programs are reused with new params."""
    from blip2_jax.eval import runner
    params = state_lib.merge(state.params, frozen)
    if model is None:
        model = api.Blip2(cfg, params, check=False).shard(mesh)
    else:
        model.params = params       # the same shardings: the step keeps the trainer's
    results = runner.run(model, evs, mesh=mesh, tokenizers=tokenizers,
                         out_dir=os.path.join(workdir, "eval", f"step_{step}"),
                         info={"step": step}, report=False, progress=False)
    writer.write(step, {f"eval/{r.name}/{k}": v for r in results
                        for k, v in r.numeric_metrics().items()})
    return model


def _throughput(steps: int, seconds: float, batch_size: int, flops: Optional[float],
                peak_tflops: Optional[float]) -> dict:
    out = {"steps_per_s": steps / seconds, "samples_per_s": steps * batch_size / seconds}
    if flops:
        tflops = flops * steps / seconds / 1e12            # counted model TFLOP/s, all devices
        out["tflops"] = tflops
        out["tflops_per_device"] = tflops / jax.device_count()
        if peak_tflops:
            out["mfu"] = out["tflops_per_device"] / float(peak_tflops)
    return out


def _progress(start: int, stop: int):
    if jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=stop, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
