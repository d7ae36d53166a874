"""`pip install .` gives a working package: every subpackage and the run configs are in the wheel,
and the command lines run from any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built as a wheel and installed (without its dependencies, which this
    environment has) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("install")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "tests", "bench", "out", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "wheel"), str(src)], check=True)
    (wheel,) = (tmp / "wheel").iterdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(tmp / "site"), str(wheel)], check=True)
    return wheel, tmp / "site"


def test_the_wheel_holds_every_module_and_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for d, _, files in os.walk(os.path.join(ROOT, "blip2_jax")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
                assert rel in names, f"{rel} is not in the wheel (pyproject.toml packages)"
    for f in os.listdir(os.path.join(ROOT, "configs")):
        if f.endswith(".py"):
            assert f"blip2_jax/configs/{f}" in names


def test_the_commands_run_from_another_directory(installed, tmp_path):
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "blip2_jax.predict", "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "--checkpoint" in out.stdout, out.stderr
    code = ("import blip2_jax, os; from blip2_jax import run_config; "
            "c = run_config.load('tiny_stage1.py:DATA'); "
            "assert blip2_jax.__file__.startswith(os.environ['PYTHONPATH']), blip2_jax.__file__; "
            "print(c.model, c.data.data_dir)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["tiny-stage1", "DATA"], out.stderr


def test_a_cpu_command_prints_no_tpu_noise(tmp_path):
    """The tests' libtpu (AOT compilation) is not importable from the environment itself: a CPU
    command there initialises JAX without TPU-initialisation errors."""
    # The environment a user's shell gives: none of the settings the test session makes (its
    # libtpu path, and the TPU_* variables importing jax with libtpu on that path sets).
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "JAX_PLATFORMS", "XLA_FLAGS") and not k.startswith("TPU_")}
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr
