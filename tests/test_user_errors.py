"""Bad input gets one clear message naming what is wrong: checkpoints with a tensor missing or of
the wrong shape, VQA templates without a slot for the question; every command line reports it
in one line `PROG: error: ...` with exit status 2 (a bug keeps its traceback)."""
from __future__ import annotations

import os
import re

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


# ----------------------------------------------------------------------------------------------
# The `python -m` entry points past their parsers: bad input is one line `PROG: error: ...` and
# exit status 2, without a traceback; --verbose or BLIP2_JAX_TRACEBACK=1 shows it; any other
# exception (a bug) keeps it. In process, nothing compiled: each mistake is caught before a model
# is built.
# ----------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mistake(name: str, tmp_path):
    """(main, its program name, argv of a user mistake, what the line names, the exception it
    raises with --verbose, (module, attribute) that a bug is planted in)."""
    import json
    from blip2_jax import aot, predict
    from blip2_jax.convert import __main__ as convert_cli, sources
    from blip2_jax.data import build as build_cli, records
    from blip2_jax.metrics import __main__ as metrics_cli
    from blip2_jax.train import features as features_cli
    if name == "predict":          # a typo in an image path
        return (predict.main, "python -m blip2_jax.predict",
                ["--checkpoint", str(tmp_path), "--image", str(tmp_path / "photo.jpgg")],
                f"image {tmp_path / 'photo.jpgg'}: no such file", ValueError,  # PredictError
                (predict, "run"))
    if name == "convert":          # a LAVIS file that is not where the command says
        return (convert_cli.main, "python -m blip2_jax.convert",
                [str(tmp_path / "blip2_pretrained.pth"), str(tmp_path / "out"), "--to", "native"],
                f"checkpoint {tmp_path / 'blip2_pretrained.pth'} does not exist",
                FileNotFoundError, (sources, "convert"))
    if name == "data.build":       # an annotation entry without its caption
        ann = tmp_path / "train.json"
        ann.write_text(json.dumps([{"image": "a.jpg", "caption": "a dog"}, {"image": "b.jpg"}]))
        return (build_cli.main, "python -m blip2_jax.data.build",
                ["captions", "--annotations", str(ann), "--image-root", str(tmp_path),
                 "--data-dir", str(tmp_path / "data")],
                f"{ann}: entry 1: missing 'caption'", records.AnnotationError,
                (records, "caption_entries"))
    if name == "metrics":          # predictions of another split than the references
        refs, preds = tmp_path / "refs.json", tmp_path / "preds.json"
        refs.write_text(json.dumps({"1": ["cat"] * 10, "2": ["dog"] * 10}))
        preds.write_text(json.dumps({"1": "cat", "3": "dog"}))
        return (metrics_cli.main, "python -m blip2_jax.metrics",
                ["vqa", "--references", str(refs), "--predictions", str(preds)],
                "1 question id(s) of the references have no entry in predictions",
                metrics_cli.InputError, (metrics_cli, "vqa_accuracy"))
    if name == "train.features":   # a model preset misspelt
        from blip2_jax.config import ConfigError
        return (lambda argv: features_cli.main(["features", *argv]),
                "python -m blip2_jax.train.features",
                [f"--config={ROOT}/configs/tiny_stage1.py:{tmp_path}",
                 "--config.model=tiny-stage-1"],
                "unknown preset 'tiny-stage-1'", ConfigError,
                (features_cli.run_config, "model_config"))
    if name == "aot":              # a pod size that does not exist
        return (lambda argv: aot.main(["aot", *argv]), "python -m blip2_jax.aot",
                [f"--config={ROOT}/configs/tiny_stage1.py", "--topology", "v5p-100"],
                "unknown TPU topology 'v5p-100'", aot.AotError, (aot, "topology_devices"))
    raise AssertionError(name)


ENTRY_POINTS = ["predict", "convert", "data.build", "metrics", "train.features", "aot"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_an_entry_point_reports_bad_input_in_one_line(name, tmp_path, capsys, monkeypatch):
    main, prog, argv, needle, error, _ = _mistake(name, tmp_path)
    monkeypatch.delenv("BLIP2_JAX_TRACEBACK", raising=False)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and needle in lines[0], lines[0]
    # --verbose, or the environment variable: the exception goes on, with its traceback.
    with pytest.raises(error, match=re.escape(needle)):
        main([*argv, "--verbose"])
    monkeypatch.setenv("BLIP2_JAX_TRACEBACK", "1")
    with pytest.raises(error, match=re.escape(needle)):
        main(argv)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_an_entry_point_keeps_the_traceback_of_a_bug(name, tmp_path, monkeypatch):
    """A ValueError that is no user error (each entry point once caught them all) goes on."""
    main, _, argv, _, _, (module, attribute) = _mistake(name, tmp_path)
    monkeypatch.delenv("BLIP2_JAX_TRACEBACK", raising=False)

    def bug(*args, **kwargs):
        raise ValueError("a bug")
    monkeypatch.setattr(module, attribute, bug)
    with pytest.raises(ValueError, match="a bug"):
        main(argv)


def test_unknown_run_config_keys_are_user_errors():
    """A misspelt mesh, sharding or model_overrides key in a config file is one line (a
    RunConfigError, which every training CLI reports as bad input), not a KeyError traceback."""
    import ml_collections

    from blip2_jax import run_config
    from blip2_jax.train import errors
    assert issubclass(run_config.RunConfigError, errors.USER_ERRORS)
    c = ml_collections.ConfigDict(dict(mesh=dict(data=1, tensr=2), sharding=dict(rule=[]),
                                       model="tiny-stage1",
                                       model_overrides=dict(vision=dict(hidden_sise=8))))
    for fn, word in ((run_config.make_mesh, "tensr"), (run_config.sharding_rules, "rule"),
                     (run_config.model_config, "hidden_sise")):
        with pytest.raises(run_config.RunConfigError, match=word):
            fn(c)
    with pytest.raises(run_config.RunConfigError, match="optimizer.lrr"):
        run_config.load("tiny_stage1.py:/nowhere", {"optimizer.lrr": 1.0})
