"""Bad input gets one clear message naming what is wrong: checkpoints with a tensor missing or of
the wrong shape, VQA templates without a slot for the question."""
from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import blip2_jax
from blip2_jax.convert.mapping import MappingError


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("native"))
    blip2_jax.Blip2.random("tiny-stage1").save(d, format="native")
    return d


def _edit(src, dst, change):
    """A copy of a native checkpoint whose tensors `change` edits (a dict, in place)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        path = os.path.join(src, f)
        if f.endswith(".safetensors"):
            tensors = load_file(path)
            change(tensors)
            save_file(tensors, os.path.join(dst, f))
        else:
            with open(path, "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    return dst


def _a_qformer_kernel(tensors):
    return next(k for k in sorted(tensors) if k.startswith("qformer/") and k.endswith("kernel"))


def test_a_missing_tensor_is_named(native_dir, tmp_path):
    name = []

    def drop(t):
        name.append(_a_qformer_kernel(t))
        del t[name[0]]
    bad = _edit(native_dir, str(tmp_path / "bad"), drop)
    with pytest.raises(MappingError) as e:
        blip2_jax.load(bad)
    msg = str(e.value)
    assert f"missing parameters (1): {name[0]}" in msg
    assert "towers with no source" not in msg


def test_a_wrong_shape_is_named_once(native_dir, tmp_path):
    name = []

    def widen(t):
        name.append(_a_qformer_kernel(t))
        t[name[0]] = np.zeros(t[name[0]].shape[:-1] + (t[name[0]].shape[-1] + 1,), np.float32)
    bad = _edit(native_dir, str(tmp_path / "bad"), widen)
    with pytest.raises(MappingError) as e:
        blip2_jax.load(bad)
    msg = str(e.value)
    assert name[0] in msg and "shape" in msg
    assert "towers with no source" not in msg and "missing parameters" not in msg


@pytest.mark.parametrize("template", ["Question: Answer:", "Q: {} and {}", "Q: {q}"])
def test_a_template_without_one_slot_is_refused(template):
    from blip2_jax import processing
    with pytest.raises(ValueError, match="exactly one {} where the question goes"):
        processing.fill_template(template, "what?")
    assert processing.fill_template("Question: {} Answer:", "a {b}") == "Question: a {b} Answer:"
    model = blip2_jax.Blip2.random("tiny-opt")
    with pytest.raises(ValueError, match="exactly one {}"):
        size = model.config.vision.image_size
        model.answer(np.zeros((1, size, size, 3), np.float32), "what?", template=template)


def test_predict_refuses_a_template_without_a_slot(native_dir, capsys):
    from blip2_jax import predict
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", native_dir, "--image", "x.png", "--question", "what?",
                      "--template", "Question: Answer:"])
    assert e.value.code == 2
    assert "--template" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import runs
    return runs.synthetic_data(str(tmp_path_factory.mktemp("data")), train=8, test=8)


@pytest.mark.parametrize("overrides, message", [
    (["--config.total_steps=-5"], "config.total_steps = -5 (must be >= 1)"),
    (["--config.total_steps=3"], "warmup_steps (5) must be < config.total_steps (3)"),
    (["--config.frozen=('vision/nothing.*',)"], "pattern 'vision/nothing.*' matches no "
                                                "parameter"),
    (["--config.batch_size=6"], "batch_size 6 is not divisible"),
    (["--config.data.train.name=blip2_captions/nope"], "dataset 'blip2_captions/nope' not found"),
])
def test_train_py_reports_bad_input_in_one_line(data_dir, tmp_path, capsys, overrides, message):
    import train
    argv = ["train.py", f"--config=configs/tiny_stage1.py:{data_dir}",
            f"--workdir={tmp_path / 'run'}", *overrides]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ") and message in err[0], err
    assert not os.path.exists(tmp_path / "run")       # a failed start leaves no work directory


def test_train_py_keeps_the_traceback_of_a_bug_and_with_verbose(data_dir, tmp_path, monkeypatch):
    import train
    from blip2_jax.run_config import RunConfigError
    from blip2_jax.train import loop
    argv = ["train.py", f"--config=configs/tiny_stage1.py:{data_dir}",
            f"--workdir={tmp_path / 'run'}", "--config.total_steps=-5"]
    with pytest.raises(RunConfigError):
        train.main(argv + ["--verbose"])

    def bug(*_):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(loop, "run", bug)
    with pytest.raises(ZeroDivisionError):
        train.main(argv[:3])


def test_a_nonfinite_tensor_is_named(native_dir, tmp_path):
    from blip2_jax.convert.stream import CheckpointError
    from blip2_jax.train import init as init_lib
    name = []

    def poison(t):
        name.append(_a_qformer_kernel(t))
        t[name[0]] = np.full_like(t[name[0]], np.nan)
    bad = _edit(native_dir, str(tmp_path / "bad"), poison)
    with pytest.raises(CheckpointError, match=rf"1 parameter\(s\) hold NaN or inf: {name[0]} "):
        blip2_jax.load(bad)
    cfg = blip2_jax.load(native_dir).config
    with pytest.raises(CheckpointError, match=name[0]):
        init_lib.initial_params(cfg, {"checkpoint": bad})


def test_an_opt_with_projected_embeddings_is_refused_as_blip2_llm():
    """OPT-350m-style (word_embed_proj_dim != hidden_size): HF's and LAVIS's BLIP-2 cannot run
    it either (their forward fails); ours says so when the config is made."""
    import dataclasses
    from blip2_jax.config import ConfigError, get_preset
    cfg = get_preset("tiny-opt")
    with pytest.raises(ConfigError, match=r"word_embed_proj_dim \(16\) != hidden_size"):
        cfg.replace(llm=dataclasses.replace(cfg.llm, word_embed_proj_dim=16))
