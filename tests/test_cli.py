"""The command-line convention (blip2_jax/cli.py) on all eight entry points: `--help` exits 0 and
lists the hyphenated flags (`--verbose` among them); the underscore spelling of a flag parses as
the hyphenated one; a `--config.KEY` the config lacks is one line on stderr and exit status 2.
In process (the parser's result is caught before any work starts), one subprocess. Bad input
past the parser: tests/test_user_errors.py."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

import runs
from blip2_jax import aot, cli, predict
from blip2_jax.convert import __main__ as convert_cli
from blip2_jax.data import build as build_cli
from blip2_jax.metrics import __main__ as metrics_cli
from blip2_jax.train import features as features_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1 = f"{ROOT}/configs/tiny_stage1.py:/nowhere"
STAGE2 = f"{ROOT}/configs/tiny_stage2.py:opt,/nowhere"


train_py, eval_py = runs.script("train"), runs.script("eval")

# Entry point → how to call its main with the arguments after the program name.
MAINS = {
    "train.py": lambda a: train_py.main(["train.py", *a]),
    "eval.py": lambda a: eval_py.main(["eval.py", *a]),
    "aot": lambda a: aot.main(["aot", *a]),
    "train.features": lambda a: features_cli.main(["features", *a]),
    "predict": predict.main,
    "convert": convert_cli.main,
    "data.build": build_cli.main,
    "metrics": metrics_cli.main,
}
DISTRIBUTED = ["--coordinator-address", "--num-processes", "--process-id", "--distributed"]
HELP = {   # (arguments before --help, flags its help lists)
    "train.py": [((), ["--config", "--workdir", "--verbose", *DISTRIBUTED])],
    "eval.py": [((), ["--config", "--workdir", "--checkpoint", "--output", "--no-report",
                      "--verbose", *DISTRIBUTED])],
    "aot": [((), ["--config", "--topology", "--program", "--json", "--no-estimate", "--hlo",
                  "--verbose"])],
    "train.features": [((), ["--config", "--batch-size", "--dtype", "--overwrite", "--verbose",
                             *DISTRIBUTED])],
    "predict": [((), ["--checkpoint", "--image", "--prompt", "--question", "--template",
                      "--num-beams", "--max-new-tokens", "--dtype", "--verbose"])],
    "convert": [((), ["--to", "--from", "--config", "--vision", "--llm", "--lavis-parts",
                      "--ln-vision-eps", "--max-shard-gb", "--verbose"])],
    "data.build": [((), ["synthetic", "captions", "retrieval", "vqa", "webdataset"]),
                   (("synthetic",), ["--data-dir", "--overwrite", "--max-image-size",
                                     "--image-size", "--min-objects", "--max-objects",
                                     "--verbose"]),
                   (("captions",), ["--data-dir", "--annotations", "--image-root", "--name",
                                    "--verbose"]),
                   (("webdataset",), ["--data-dir", "--shards", "--split", "--verbose"])],
    "metrics": [((), ["caption", "vqa", "gqa"]),
                (("caption",), ["--references", "--predictions", "--no-meteor", "--tokenize",
                                "--verbose"]),
                (("vqa",), ["--answer-types", "--num-answers", "--lemmatize", "--rules",
                            "--verbose"]),
                (("gqa",), ["--no-normalize", "--verbose"])],
}


@pytest.mark.parametrize("name, before, expected",
                         [(n, b, e) for n, cases in HELP.items() for b, e in cases])
def test_help_exits_0_and_lists_the_hyphenated_flags(name, before, expected, capsys):
    with pytest.raises(SystemExit) as e:
        MAINS[name]([*before, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    missing = [f for f in expected if f not in out]
    assert not missing, (missing, out)
    assert not [f for f in re.findall(r"--[\w-]+", out) if "_" in f], out


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__()
        self.namespace = namespace


def _parse(monkeypatch, name: str, argv: list) -> dict:
    """What the entry point's parser makes of `argv` (stopped before any work)."""
    real = cli.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        raise _Parsed(real(self, *args, **kwargs))
    monkeypatch.setattr(cli.ArgumentParser, "parse_args", spy)
    with pytest.raises(_Parsed) as e:
        MAINS[name](argv)
    return vars(e.value.namespace)


@pytest.mark.parametrize("name, underscores, hyphens", [
    ("train.py",
     ["--config", STAGE1, "--workdir", "w", "--coordinator_address=h:1", "--num_processes", "2",
      "--process_id=1"],
     ["--config", STAGE1, "--workdir", "w", "--coordinator-address", "h:1", "--num-processes=2",
      "--process-id", "1"]),
    ("eval.py", ["--config", STAGE2, "--checkpoint", "c", "--no_report"],
     ["--config", STAGE2, "--checkpoint", "c", "--no-report"]),
    ("aot", ["--config", STAGE1, "--topology", "v5p-8", "--noestimate"],      # absl's --noflag
     ["--config", STAGE1, "--topology", "v5p-8", "--no-estimate"]),
    ("train.features", ["--config", STAGE1, "--batch_size=8", "--process_id", "0"],
     ["--config", STAGE1, "--batch-size", "8", "--process-id=0"]),
    ("predict", ["--checkpoint", "c", "--image", "i", "--num_beams", "3", "--max_new_tokens=7"],
     ["--checkpoint", "c", "--image", "i", "--num-beams=3", "--max-new-tokens", "7"]),
    ("convert", ["s", "d", "--to", "lavis", "--lavis_parts", "trainable", "--ln_vision_eps=1e-6",
                 "--max_shard_gb", "2"],
     ["s", "d", "--to", "lavis", "--lavis-parts=trainable", "--ln-vision-eps", "1e-6",
      "--max-shard-gb", "2"]),
    ("data.build", ["synthetic", "--data_dir", "d", "--image_size=16", "--max_objects", "2"],
     ["synthetic", "--data-dir", "d", "--image-size", "16", "--max-objects=2"]),
    ("metrics", ["vqa", "--references", "r", "--predictions", "p", "--answer_types", "t",
                 "--num_answers", "any"],
     ["vqa", "--references", "r", "--predictions", "p", "--answer-types=t",
      "--num-answers", "any"]),
])
def test_underscore_and_hyphen_spellings_parse_alike(monkeypatch, name, underscores, hyphens):
    a, b = _parse(monkeypatch, name, underscores), _parse(monkeypatch, name, hyphens)
    assert a == b
    if name == "train.py":
        assert (a["coordinator_address"], a["num_processes"], a["process_id"]) == ("h:1", 2, 1)
    elif name == "eval.py":
        assert a["report"] is False
        assert _parse(monkeypatch, name, hyphens[:-1])["report"] is True
    elif name == "aot":
        assert a["estimate"] is False
        assert _parse(monkeypatch, name, hyphens[:-1])["estimate"] is True
    elif name == "train.features":
        assert (a["batch_size"], a["process_id"]) == (8, 0)
    elif name == "convert":
        assert (a["lavis_parts"], a["ln_vision_eps"], a["max_shard_gb"]) == ("trainable", 1e-6, 2)


def test_config_overrides_parse_as_the_entries_types(monkeypatch):
    args = _parse(monkeypatch, "train.py", [
        "--config", STAGE1, "--workdir", "w", "--config.optimizer.lr=1e-4",
        "--config.total_steps", "7", "--config.data.data_dir=/d"])
    config = args["config"]
    assert (config.optimizer.lr, config.total_steps, config.data.data_dir) == (1e-4, 7, "/d")
    assert args["config_file"] == STAGE1
    with pytest.raises(AttributeError):            # lock_config: no new keys
        config.new_key = 1


@pytest.mark.parametrize("name, args", [
    ("train.py", ["--config", STAGE1, "--workdir", "w"]),
    ("eval.py", ["--config", STAGE2, "--checkpoint", "c"]),
    ("aot", ["--config", STAGE1, "--topology", "v5p-8"]),
    ("train.features", ["--config", STAGE1]),
])
def test_an_unknown_override_is_one_line_and_status_2(name, args, capsys):
    for bad, needle in [("--config.nope=1", "--config.nope"),
                        ("--config.optimizer.nope=1", "--config.optimizer.nope"),
                        ("--config.total_steps=many", "many")]:
        with pytest.raises(SystemExit) as e:
            MAINS[name]([*args, bad])
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert len(err.strip().splitlines()) == 1 and needle in err, err
        assert ": error: " in err


def test_a_usage_error_process_is_one_line():
    """A real process: an unknown override is one line on stderr, exit status 2, no
    traceback; the old absl spellings work next to it."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", STAGE1,
                           "--workdir", "w", "--num_processes=1", "--config.nope=1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: --config.nope: {STAGE1} has no such entry"], proc.stderr


def test_hyphenate_leaves_values_overrides_and_positionals_alone():
    p = cli.ArgumentParser(prog="p")
    p.add_argument("--foo-bar")
    p.add_argument("--baz", action=argparse.BooleanOptionalAction)
    assert cli.hyphenate(p, ["--foo_bar=x_y", "--config.a_b=1", "--nobaz", "--no_baz", "--un_known",
                             "a_b", "--", "--foo_bar"]) == [
        "--foo-bar=x_y", "--config.a_b=1", "--no-baz", "--no-baz", "--un_known", "a_b", "--",
        "--foo_bar"]
    assert cli.split_overrides(["--config", "c", "--config.a=1", "--config.b", "2", "--x",
                                "--config.flag", "--y", "--noconfig.z"]) == (
        ["--config", "c", "--x", "--y"],
        ["--config.a=1", "--config.b=2", "--config.flag", "--noconfig.z"])
    gqa = ["gqa", "--references", "r", "--predictions", "p"]
    assert metrics_cli.build_parser().parse_args(gqa).normalize is True
    assert metrics_cli.build_parser().parse_args([*gqa, "--no_normalize"]).normalize is False
