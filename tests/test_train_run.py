"""train.py end to end on the tiny configs and the synthetic dataset: an interrupted (SIGTERM) and
resumed run equals an uninterrupted one; stage-2 runs export a loadable model; non-finite
losses stop the run; parameter sources and frozen-tower hashes are enforced."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import blip2_jax
import runs
from blip2_jax import checkpoint as ckpt_lib
from blip2_jax import processing
from blip2_jax.convert.mapping import flatten
from blip2_jax.data import build as build_cli
from blip2_jax.train import init as init_lib
from blip2_jax.train import loop
from blip2_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return runs.synthetic_data(str(tmp_path_factory.mktemp("synthetic")), train=64, val=8,
                               test=8)


def _config(name, arg, **overrides):
    return runs.config(name, arg, **{"total_steps": 6, **overrides})


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final(workdir):
    return flatten(jax.tree.map(np.asarray, blip2_jax.load(os.path.join(workdir, "final"),
                                                          dtype=None).params))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The work directory of tiny_stage1 run for 6 steps in one go, in this process (8 devices):
    what an interrupted run and a two-process run are compared with."""
    whole = str(tmp_path_factory.mktemp("uninterrupted") / "whole")
    loop.run(_config("tiny_stage1", data_dir), whole)
    return whole


def test_sigterm_then_resume_equals_an_uninterrupted_run(data_dir, uninterrupted, tmp_path):
    whole = uninterrupted

    # The same run, preempted by SIGTERM after its first logged step, then re-run.
    parts = str(tmp_path / "parts")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           f"{os.path.join(ROOT, 'configs', 'tiny_stage1.py')}:{data_dir}", "--workdir", parts,
           "--config.total_steps=6", "--config.batch_size=8", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=2", "--config.optimizer.warmup_steps=2"]
    env = dict(os.environ)      # the same devices as this process (tests/conftest.py)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = os.path.join(parts, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["step"] < 6 and stopped["preempted"], stopped
    assert ckpt_lib.Checkpointer(os.path.join(parts, "checkpoints")).latest_step() == \
        stopped["step"]
    assert not os.path.exists(os.path.join(parts, "final"))

    result = loop.run(_config("tiny_stage1", data_dir), parts)
    assert result["step"] == 6 and not result["preempted"]
    a = {r["step"]: r for r in _rows(whole)}
    b = {r["step"]: r for r in _rows(parts)}
    assert set(b) >= set(range(1, stopped["step"] + 1)) | {6}
    for step, row in b.items():
        for k in ("loss", "itc", "itm", "itg", "grad_norm", "lr", "param_norm"):
            assert row[k] == pytest.approx(a[step][k], rel=1e-6, abs=1e-7), (step, k)
    fa, fb = _final(whole), _final(parts)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Frozen towers are recorded by source and hash; a different tower refuses to resume.
    meta = json.load(open(os.path.join(parts, "config.json")))
    assert set(meta["frozen"]) == {"vision"} and len(meta["frozen"]["vision"]["sha256"]) == 64
    with pytest.raises(loop.ResumeError, match="seed: 0 -> 1"):
        loop.run(_config("tiny_stage1", data_dir, seed=1, total_steps=8), parts)
    with pytest.raises(ckpt_lib.CheckpointError, match="vision: content hash"):
        loop.run(_config("tiny_stage1", data_dir, seed=1, total_steps=8,
                         allow_config_change=True), parts)


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
def test_tiny_stage2_trains_and_exports(data_dir, uninterrupted, tmp_path, llm, caplog):
    work = str(tmp_path / llm)
    # Full LR from the second step, 5x the config's: 4 steps must move the loss past the noise
    # of drawing a new batch each step (the tiny random LLMs start near log V).
    c = _config("tiny_stage2", f"{llm},{data_dir}", total_steps=4, peak_tflops_per_device=0.5,
                **{"optimizer.warmup_steps": 1, "optimizer.lr": 5e-3})
    stage1 = os.path.join(uninterrupted, "final")
    if llm == "opt":        # from a stage-1 run's export, as the paper's stage 2
        c.init = dict(stage1=stage1, random=("llm", "llm_proj"))
    with caplog.at_level("INFO", logger="blip2_jax.train.loop"):
        result = loop.run(c, work)
    # The run says, in one line, where each parameter came from.
    said = [r.getMessage() for r in caplog.records if "initial parameters:" in r.getMessage()]
    assert len(said) == 1, said
    assert (f"llm, llm_proj <- random init; ln_vision, qformer, query_tokens, vision <- stage-1 "
            f"model {stage1}" if llm == "opt" else "query_tokens, vision <- random init") \
        in said[0], said[0]
    rows = _rows(work)
    assert result["step"] == 4 and all(np.isfinite(r["lm"]) for r in rows)
    assert rows[-1]["lm"] < rows[0]["lm"]
    # Throughput from counted model FLOPs of the global batch (train/flops.py), all devices.
    from blip2_jax.train import flops as flops_lib
    from blip2_jax.losses import LossConfig
    n = c.text.max_length
    count = flops_lib.train_step_flops(run_config.model_config(c), LossConfig(), c.batch_size, n,
                                       target_len=n if llm == "t5" else None)
    for r in rows[1:]:
        np.testing.assert_allclose(r["tflops"], count * r["steps_per_s"] / 1e12, rtol=1e-6)
        np.testing.assert_allclose(r["mfu"], r["tflops"] / jax.device_count() / 0.5, rtol=1e-6)
    model = blip2_jax.load(os.path.join(work, "final"), dtype=None)
    assert model.config.llm_kind == llm
    # The frozen LLM was trained (and is exported) in bf16; the trained parts in float32.
    assert {str(x.dtype) for x in jax.tree.leaves(model.params["llm"])} == {"bfloat16"}
    assert {str(x.dtype) for x in jax.tree.leaves(model.params["qformer"])} == {"float32"}
    if llm == "opt":     # BLIP-2 OPT captions end with "\n": the exported model stops there
        tok = processing.load_tokenizer(build_cli.tokenizer_dir(data_dir) + "/opt",
                                        "opt")
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        assert [model.config.llm.eos_token_id] == newline != [2]
    if llm == "llama":   # `[BOS] caption EOS` rows: the exported model stops at the EOS
        assert model.config.llm.eos_token_id == 2


def test_nonfinite_halt_names_the_first_bad_step_when_checked_rarely(data_dir, tmp_path):
    """A non-finite loss stops the run naming its step. The loop reads the step's `finite` flag
    only on log and checkpoint steps: halting must still name the first non-finite step (as
    reading every step does), and no checkpoint may hold a non-finite state."""
    def named_step(log_every, ckpt_every, workdir):
        # The LR ramps from 1e-5 to 1e12 over 8 steps: the loss turns non-finite part-way.
        c = _config("tiny_stage1", data_dir, total_steps=10, log_every_steps=log_every,
                    checkpoint_every_steps=ckpt_every)
        c.optimizer.update(lr=1e12, warmup_lr=1e-5, warmup_steps=8)
        with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss at step \d+; the last "
                                                     r"checkpoint is step") as e:
            loop.run(c, workdir)
        return int(str(e.value).split("non-finite loss at step ")[1].split(";")[0]), workdir
    every, _ = named_step(1, 100, str(tmp_path / "every"))
    assert 1 < every <= 10
    rarely, workdir = named_step(100, 1, str(tmp_path / "rarely"))
    assert rarely == every
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    try:
        steps = checkpointer.manager.all_steps()
    finally:
        checkpointer.close()
    assert steps and max(steps) == every - 1        # every finite step saved, no later one


def test_a_batch_the_mesh_does_not_divide_is_refused_or_padded(data_dir, tmp_path):
    c = _config("tiny_stage1", data_dir, total_steps=3, batch_size=6)    # 8 devices
    with pytest.raises(ValueError, match=r"batch_size 6 is not divisible .*pad_batch=True "
                                         r"\(steps of 8 rows, the extra 2 padding"):
        loop.run(c, str(tmp_path / "refused"))
    c.pad_batch = True
    out = loop.run(c, str(tmp_path / "padded"))
    assert out["step"] == 3 and np.isfinite(out["loss"])
    rows = _rows(str(tmp_path / "padded"))
    assert rows[-1]["samples_per_s"] > 0


def test_unnamed_sources_fail(data_dir, tmp_path):
    c = _config("tiny_stage1", data_dir)
    c.init = dict(random=("vision_proj", "text_proj", "temp", "itm_head"))
    with pytest.raises(init_lib.InitError, match=r"no source for .* under \['lm_head', "
                                                 r"'ln_vision', 'qformer', 'query_tokens', "
                                                 r"'vision'\]"):
        loop.run(c, str(tmp_path / "x"))
    c.init = dict(random=("*",), vision=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.init.vision = .*nowhere' does not exist"):
        loop.run(c, str(tmp_path / "y"))
    # A stage-2 config starts from the stage-1 model it names, never from a default one: the
    # demo's names its work directory's (configs/demo.py:stage2,WORK), else a placeholder that
    # fails naming the key before anything loads.
    assert run_config.load("demo.py:stage2,W").init.stage1 == "W/stage1/final"
    c = run_config.load("demo.py:stage2")
    with pytest.raises(init_lib.MissingSource, match=r"config.init.stage1 = '/path/to/stage1_run/"
                                                     r"final' does not exist: set --config.init."
                                                     r"stage1=PATH, the stage-1 model"):
        init_lib.initial_params(run_config.model_config(c), run_config.section(c, "init"))


def test_two_processes_give_the_same_losses_as_one(data_dir, uninterrupted, tmp_path):
    """train.py under jax.distributed: 2 local processes × 2 CPU devices (gloo collectives)
    against one process (this one's uninterrupted run, 8 devices), the same global batch and
    config: the same losses."""
    cfg = f"{os.path.join(ROOT, 'configs', 'tiny_stage1.py')}:{data_dir}"
    common = ["--config.total_steps=6", "--config.batch_size=8", "--config.log_every_steps=1",
              "--config.checkpoint_every_steps=2", "--config.optimizer.warmup_steps=2"]

    def launch(workdir, devices, extra=()):
        return runs.spawn([sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg,
                           "--workdir", workdir, *common, *extra], devices)

    one = uninterrupted
    two = str(tmp_path / "two")
    port = runs.free_port()
    procs = [launch(two, 2, runs.distributed_flags(port, i)) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    a, b = {r["step"]: r for r in _rows(one)}, {r["step"]: r for r in _rows(two)}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        for k in ("loss", "itc", "itm", "itg", "grad_norm", "param_norm"):
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-5), (step, k)
    # Process 1 wrote its own data-iterator state beside process 0's.
    data = os.path.join(two, "checkpoints", "6", "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data))
    fa, fb = _final(one), _final(two)
    for k in fa:
        # Zero true gradient: Adam-amplified noise (test_train). Elsewhere Adam's normalisation
        # also amplifies the reduction-order noise of a near-zero gradient element, by up to a
        # fraction of an LR step (1e-3 here): atol 1e-5 (1.9e-6 seen on ln_vision/bias).
        if not k.endswith("key/bias"):
            np.testing.assert_allclose(fb[k], fa[k], rtol=1e-5, atol=1e-5, err_msg=k)
