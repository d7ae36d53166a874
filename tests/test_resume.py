"""Resuming a train.py work directory: a config that changes what the run computes is refused
(listing the differences) unless allowed, a stage-2 config on a stage-1 directory is named, the
metrics log holds each step once after a hard stop, and Ctrl-C (SIGINT) saves like SIGTERM."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

import runs
from blip2_jax import checkpoint as ckpt_lib
from blip2_jax.train import loop


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return runs.synthetic_data(str(tmp_path_factory.mktemp("synthetic")), train=32, test=8)


def _config(data_dir, **overrides):
    return runs.config("tiny_stage1", data_dir, **{"total_steps": 4, **overrides})


def _steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _checkpoints(workdir):
    c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
    try:
        return list(c.manager.all_steps())
    finally:
        c.close()


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
    """A run stopped at step 2 of 4 (checkpoint at 2), copied fresh for each test."""
    src = str(tmp_path_factory.mktemp("stopped") / "run")
    loop.run(_config(data_dir, stop_after_steps=2), src)
    return src


def _copy(src, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    return dst


def test_a_changed_config_is_refused_listing_what_differs(data_dir, stopped, tmp_path):
    work = _copy(stopped, tmp_path)
    before = _checkpoints(work), _steps(work)
    c = _config(data_dir, batch_size=4)
    c.optimizer.lr = 0.5
    with pytest.raises(loop.ResumeError) as e:
        loop.run(c, work)
    msg = str(e.value)
    assert "batch_size: 8 -> 4" in msg and "optimizer.lr: 0.001 -> 0.5" in msg
    assert "allow_config_change=True" in msg
    assert (_checkpoints(work), _steps(work)) == before == ([1, 2], [1, 2])   # untouched
    with open(os.path.join(work, "config.json")) as f:
        assert json.load(f)["config"]["batch_size"] == 8


def test_allowed_changes_continue_and_keep_the_old_config(data_dir, stopped, tmp_path):
    work = _copy(stopped, tmp_path)
    # total_steps and the logging settings may change without the flag.
    out = loop.run(_config(data_dir, total_steps=5, log_every_steps=2), work)
    assert out["step"] == 5 and not os.path.exists(os.path.join(work, "config.until_step_2.json"))
    work = _copy(stopped, tmp_path / "b")
    c = _config(data_dir, allow_config_change=True)
    c.optimizer.lr = 2e-3
    assert loop.run(c, work)["step"] == 4
    with open(os.path.join(work, "config.until_step_2.json")) as f:
        assert json.load(f)["config"]["optimizer"]["lr"] == 1e-3
    with open(os.path.join(work, "config.json")) as f:
        assert json.load(f)["config"]["optimizer"]["lr"] == 2e-3


def test_a_stage2_config_on_a_stage1_workdir_is_named(data_dir, stopped, tmp_path):
    work = _copy(stopped, tmp_path)
    c = runs.config("tiny_stage2", f"opt,{data_dir}", total_steps=4)
    with pytest.raises(loop.ResumeError, match=r"holds a stage 1 .* run .*this config trains "
                                               r"stage 2 \(OPT LLM\)"):
        loop.run(c, work)
    with pytest.raises(loop.ResumeError, match=r"holds a stage 1 .* model; this config is for "
                                               r"stage 2"):
        loop.load_trained(c, work)


def test_metrics_hold_each_step_once_after_a_hard_stop(data_dir, stopped, tmp_path):
    work = _copy(stopped, tmp_path)
    # A hard stop after step 3 was logged but before its checkpoint was complete: the log has a
    # row the checkpoints do not.
    with open(os.path.join(work, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    loop.run(_config(data_dir), work)
    assert _steps(work) == [1, 2, 3, 4]


def test_sigint_saves_a_checkpoint_like_sigterm(data_dir, tmp_path, monkeypatch):
    work = str(tmp_path / "run")
    sent = []
    throughput = loop._throughput

    def interrupt_once(*a, **k):            # called at each logged step
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return throughput(*a, **k)
    monkeypatch.setattr(loop, "_throughput", interrupt_once)
    out = loop.run(_config(data_dir, total_steps=6, checkpoint_every_steps=100), work)
    assert out["preempted"] and out["step"] < 6
    assert max(_checkpoints(work)) == out["step"]
    monkeypatch.setattr(loop, "_throughput", throughput)
    assert loop.run(_config(data_dir, total_steps=6, checkpoint_every_steps=100),
                    work)["step"] == 6
    assert _steps(work) == sorted(set(_steps(work)))
