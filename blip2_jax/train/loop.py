"""The training run behind `train.py`: config → mesh, data, parameters, trainer, checkpoints →
steps, with metrics, resumption, preemption and a final export.

`WORKDIR/` holds:
- `checkpoints/`: orbax; see `blip2_jax.checkpoint`;
- `metrics.jsonl`: one JSON object per logged step;
- `tb/`: TensorBoard events;
- `config.json`: the resolved config;
- `final/`: at the end of the run, the whole model in our native format with the tokenizers
  the run read its text with (config.text: the LLM's in `final/` itself, the Q-Former's in
  `final/qformer_tokenizer/`, as HF's processors lay them out), so `blip2_jax.load`, `predict`
  and `eval.py --checkpoint` use it as it is; a stage-2 config names it in `init.stage1`.

Re-running the same command resumes from the latest checkpoint; SIGTERM saves one and exits.
`stop_after_steps` ends the run at that step as a preemption would, while the schedule still
follows `total_steps`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from typing import Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from blip2_jax import (api, checkpoint as ckpt_lib, config as config_lib, processing,
                       run_config, sharding as sharding_lib)
from blip2_jax.data import batch as batch_lib, features, pipeline
from blip2_jax.eval import evaluators, runner
from blip2_jax.train import (errors, features as feature_builder, init as init_lib,
                             state as state_lib)
from blip2_jax.train.metrics import MetricWriter, drop_rows_after
from blip2_jax.train.trainer import Trainer

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict:
    """A host batch padded with zero rows (valid False) to `rows` rows."""
    n = len(batch["valid"])
    if n == rows:
        return dict(batch)
    return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def run_tokenizers(config, cfg: config_lib.Blip2Config) -> dict:
    """{"tokenizer": the LLM's, "qformer_tokenizer": the Q-Former's}: those config.text names
    (and that are there), loaded as the run reads them: what its export carries."""
    paths = run_config.tokenizer_paths(config)
    out = {}
    for key, kind, attr in (("llm", cfg.llm_kind if cfg.llm is not None else None, "tokenizer"),
                            ("qformer", "qformer", "qformer_tokenizer")):
        if kind and paths[key] and os.path.isdir(paths[key]):
            out[attr] = processing.load_tokenizer(paths[key], kind)
    return out


def _export(path: str, cfg: config_lib.Blip2Config, params, frozen_dtype: Optional[str],
            frozen_towers: set, tokenizers: Mapping):
    """The whole model, native format, with `tokenizers` (`run_tokenizers`); frozen towers keep
    their stored dtype (the config says so), trained ones are float32."""
    host = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    if jax.process_index() != 0:
        return
    if frozen_dtype:
        if "vision" in frozen_towers:
            cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, param_dtype=frozen_dtype))
        if "llm" in frozen_towers and cfg.llm is not None:
            cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, param_dtype=frozen_dtype))
    api.Blip2(cfg, host, check=False, **tokenizers).save(path, format="native")


class ResumeError(ValueError):
    """A work directory holding a run that the config given does not continue."""


def run(config, workdir: str) -> dict:
    """Train (or resume) to `total_steps` (or `stop_after_steps`); returns the last metrics."""
    run_config.validate(config)
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.get("keep_checkpoints", 3),
        save_interval_steps=int(config.checkpoint_every_steps))
    try:
        return _run(config, workdir, checkpointer)
    except BaseException:
        checkpointer.close()
        # A run that failed to start leaves no work directory behind (one it made itself and
        # wrote no checkpoint or metric into), so the next attempt is not taken for a resume.
        if created and checkpointer.latest_step() is None and jax.process_index() == 0 \
                and not _logged(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        checkpointer.close()


def _logged(workdir: str) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.isfile(path) and os.path.getsize(path) > 0


def _check_resume(config, saved: Mapping, workdir: str, step: int) -> list[str]:
    """The config entries a resumed run changes (RESUMABLE_CHANGES aside): refused unless
    `allow_config_change`, with the stage the work directory holds when the model differs."""
    changes = run_config.config_changes(saved["config"], config)
    if not changes:
        return []
    stage = run_config.stage_of(saved["model"])
    now = run_config.stage_of(run_config.model_config(config).to_dict())
    if stage != now:
        raise ResumeError(f"{workdir} holds a {stage} run (checkpoint step {step}); this config "
                          f"trains {now}: use another --workdir, or the run's own config")
    if not config.get("allow_config_change"):
        shown = "\n  ".join(changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
        raise ResumeError(
            f"{workdir} holds a run (checkpoint step {step}) whose config differs from this "
            f"one in what it computes (saved -> now):\n  {shown}\nResume with the run's own "
            f"config (only total_steps and the logging, checkpoint and evaluation settings may "
            f"change), use another --workdir, or pass --config.allow_config_change=True to "
            f"continue with the new values")
    for c in changes:
        log.warning("resuming with a changed config (allow_config_change): %s", c)
    return changes


def _run(config, workdir: str, checkpointer: ckpt_lib.Checkpointer) -> dict:
    resumed_from = checkpointer.latest_step()
    changed = []
    if resumed_from is not None:
        changed = _check_resume(config, checkpointer.meta(resumed_from), workdir, resumed_from)
    cfg = run_config.model_config(config)
    total = int(config.total_steps)
    stop_at = int(config.get("stop_after_steps") or 0) or total
    mesh = run_config.make_mesh(config)
    step_batch = run_config.step_batch(config, mesh)
    text = run_config.text_setup(config, cfg)
    loss_cfg = dataclasses.replace(text.loss, masked_rows=step_batch != int(config.batch_size))
    cfg = run_config.with_caption_eos(config, cfg)
    data_cfg = run_config.data_config(config, cfg, text)
    fields = run_config.batch_fields(config, cfg, text)
    eval_every = int(run_config.section(config, "eval").get("every_steps") or 0)
    evs, eval_tokenizers = run_config.evaluators(config) if eval_every > 0 else ([], None)
    if jax.process_count() > 1 and any(ev.kind == "retrieval" for ev in evs):
        raise evaluators.EvalConfigError(
            "config.eval: retrieval evaluators run in one process; drop them from in-training "
            "evaluation of a multi-host run (eval.py runs them after)")
    frozen_dtype = config.get("frozen_dtype") or None
    skip_nonfinite = config.get("on_nonfinite", "stop") == "skip"
    trainer = Trainer(cfg, loss_cfg, run_config.section(config, "optimizer"), total_steps=total,
                      mesh=mesh, skip_nonfinite=skip_nonfinite,
                      **run_config.trainer_options(config))

    params, sources = init_lib.initial_params(cfg, run_config.section(config, "init"),
                                              int(config.seed))
    if resumed_from is None:
        log.info("initial parameters: %s", init_lib.describe(sources))
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

    it = iter(data.dataset())
    meta = {"config": run_config.plain(config), "model": cfg.to_dict(), "frozen": frozen_meta,
            "sources": sources}
    if resumed_from is not None:
        state, saved = checkpointer.restore(trainer.abstract_state(), it)
        ckpt_lib.check_frozen(saved["frozen"], frozen_meta)
        log.info("resumed from step %d", int(state.step))
    if jax.process_index() == 0:
        _write_config(workdir, meta, resumed_from if changed else None)
        if resumed_from is not None:
            # Rows logged after the checkpoint (a hard stop) are computed again from here.
            drop_rows_after(workdir, resumed_from)

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    preempted = {"flag": False}
    # SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, checkpoint, return.
    stop = lambda *_: preempted.update(flag=True)                          # noqa: E731
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    step = int(state.step)
    last: dict = {}
    eval_model = None
    local_rows = step_batch // jax.process_count()

    def next_batch():
        """The next batch on the devices, and the iterator's state once it is drawn: what a
        checkpoint taken after this batch's step resumes from."""
        host = pad_rows(batch_lib.select(next(it), fields), local_rows)
        return trainer.place(host), it.get_state()
    # Log lines (compiling, evaluating) go above the progress bar, not into it: the console
    # handlers of this module's logger and of those it propagates to write through tqdm.
    chain, logger = [], log
    while logger is not None:
        chain.append(logger)
        logger = logger.parent if logger.propagate else None
    redirect = logging_redirect_tqdm(chain)
    redirect.__enter__()
    try:
        batch, drawn = next_batch()
        log.info("compiling the training step")
        t_compile = time.perf_counter()
        compiled = trainer.compile(state, frozen, batch)
        log.info("compiled in %.0f s", time.perf_counter() - t_compile)
        # The model's FLOPs for the real rows (padding is not useful work).
        flops = trainer.model_flops(batch) * int(config.batch_size) / step_batch
        bar = _progress(step, stop_at)
        t_window, n_window = time.perf_counter(), 0
        unchecked: list = []    # (step, its device-side `finite` flag) not yet read
        while step < stop_at:
            # Dispatched, not waited for: the next batch is read, processed and placed while
            # this step runs. The host reads the device only on log, eval and checkpoint steps.
            state, metrics = compiled(state, frozen, batch)
            step += 1
            n_window += 1
            consumed = drawn
            unchecked.append((step, metrics["finite"]))
            done = preempted["flag"] or step == stop_at
            if not done:
                batch, drawn = next_batch()
            if len(unchecked) >= 2:
                # At most two steps in flight: the batches placed ahead stay bounded.
                unchecked[-2][1].block_until_ready()
            log_now = step % int(config.log_every_steps) == 0 or step in (1, stop_at)
            save_now = done or checkpointer.should_save(step)
            eval_now = bool(evs) and not preempted["flag"] and (step % eval_every == 0
                                                                 or step == total)
            if log_now or save_now or eval_now:
                # Before anything is written: halt names the first non-finite step, and a
                # non-finite state is never checkpointed.
                _check_finite(unchecked, skip_nonfinite, checkpointer.latest_step())
                unchecked = []
            if log_now:
                dt = time.perf_counter() - t_window
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(_throughput(n_window, dt, int(config.batch_size), flops,
                                        config.get("peak_tflops_per_device")))
                last["data_skipped"] = pipeline.skipped(it)[0]
                writer.write(step, last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                t_window, n_window = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if save_now:
                checkpointer.save(step, state, _IteratorState(consumed), meta, force=done)
            if eval_now:
                log.info("step %d: evaluating %s", step, ", ".join(ev.name for ev in evs))
                eval_model = _evaluate(evs, eval_tokenizers, cfg, state, frozen, mesh, workdir,
                                       step, writer, eval_model)
                t_window, n_window = time.perf_counter(), 0     # eval time is not step time
            if done:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        writer.close()
        redirect.__exit__(None, None, None)
    if step == total:
        _export(os.path.join(workdir, "final"), cfg,
                state_lib.merge(state.params, frozen), frozen_dtype, set(frozen_tops),
                run_tokenizers(config, cfg) if jax.process_index() == 0 else {})
    return {"step": step, "preempted": preempted["flag"], **last}


def _write_config(workdir: str, meta: Mapping, changed_at: Optional[int]) -> None:
    """WORKDIR/config.json: the run's config; a resume that changed it keeps the previous one
    as config.until_step_N.json."""
    path = os.path.join(workdir, "config.json")
    if changed_at is not None and os.path.isfile(path):
        os.replace(path, os.path.join(workdir, f"config.until_step_{changed_at}.json"))
    with open(path, "w") as f:
        json.dump(meta, f, indent=2, default=str)


class _IteratorState:
    """A data iterator's state taken earlier, saved in its place: the loop draws the next batch
    before the step that precedes it is checkpointed. grain's checkpoint handler writes what
    `get_state()` returns as JSON text (the same file a live iterator gives), and restores it into
    the live iterator."""

    def __init__(self, state):
        self._state = state

    def get_state(self) -> bytes:
        return json.dumps(self._state, indent=4).encode()


def _check_finite(unchecked: list, skip: bool, last_checkpoint: Optional[int]) -> None:
    """Reads the `finite` flags of the steps not yet checked: halts at the first non-finite one
    (`on_nonfinite="stop"`), or says which updates the step skipped ("skip")."""
    flags = jax.device_get([f for _, f in unchecked])
    bad = [s for (s, _), ok in zip(unchecked, flags) if not bool(ok)]
    if not bad:
        return
    if not skip:
        raise NonFiniteLoss(f"non-finite loss at step {bad[0]}; the last checkpoint is step "
                            f"{last_checkpoint}")
    for s in bad:
        log.warning("step %d: non-finite loss, update skipped", s)


def _feature_caches(config, cfg, trainer: Trainer, frozen_host, frozen_meta) -> None:
    """config.data.features: computes the caches the run lacks (data/features.py) with the
    run's own frozen ViT; one that exists is checked, never replaced."""
    features.require_frozen_vision(not trainer.loss_cfg.train_vision and "vision" in frozen_meta,
                                   tuple(config.get("frozen") or ()))
    n = jax.local_device_count()
    batch = n * -(-min(int(config.batch_size), 256) // n)
    feature_builder.build_with(config, cfg, frozen_host["vision"], frozen_meta["vision"]["sha256"],
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
        wanted = run_config.stage_of(run_config.model_config(config).to_dict())

        def check_stage(held: Mapping, where: str):
            if run_config.stage_of(held) != wanted:
                raise ResumeError(f"{where} holds a {run_config.stage_of(held)} model; this "
                                  f"config is for {wanted}: pass the run's own config")
        if os.path.isdir(final) and (latest is None or latest >= total):
            model = api.load(final, dtype=None)
            check_stage(model.config.to_dict(), final)
            return model, {"source": final, "step": latest or total}
        if latest is None:
            raise FileNotFoundError(f"{workdir} holds neither a final/ export nor checkpoints/ "
                                    "(is it a train.py workdir?)")
        check_stage(checkpointer.meta(latest)["model"], os.path.join(ckpt_dir, str(latest)))
        cfg = run_config.model_config(config)
        loss_cfg = run_config.text_setup(config, cfg).loss
        cfg = run_config.with_caption_eos(config, cfg)
        frozen_dtype = config.get("frozen_dtype") or None
        trainer = Trainer(cfg, loss_cfg, run_config.section(config, "optimizer"),
                          total_steps=total, mesh=run_config.make_mesh(config),
                          **run_config.trainer_options(config))
        params, sources = init_lib.initial_params(cfg, run_config.section(config, "init"),
                                                  int(config.seed))
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
    return tqdm(total=stop, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)


# What train.py and eval.py report as bad input (one line, exit 2): the run-config entry
# points' (train/errors.py) and a work directory the config does not continue. Anything else
# is a bug and keeps its traceback.
USER_ERRORS = (*errors.USER_ERRORS, ResumeError)
