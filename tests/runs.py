"""Shared by the tests that run train.py / eval.py: a small synthetic dataset and the repo's
configs loaded with test-sized overrides."""
from __future__ import annotations

import importlib.util
import os

from blip2_jax import run_config
from blip2_jax.data import build as build_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name: str):
    """The repository's `NAME.py` entry point (train, eval) as a module, to call its main()."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}",
                                                  os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_data(directory: str, *, train: int, test: int, val: int = 0) -> str:
    """The synthetic dataset (32 px images) and its tokenizers, built into `directory`."""
    assert build_cli.main(["synthetic", "--data-dir", directory, "--train", str(train),
                           "--val", str(val), "--test", str(test), "--image-size", "32"]) == 0
    return directory


def config(name: str, arg, *, total_steps: int, **overrides):
    """configs/NAME.py:ARG with total_steps, batch 8, a log every step, a checkpoint every 2
    steps and 2 warm-up steps; `overrides` are dotted keys ("eval.every_steps": 2)."""
    c = run_config.load(f"{name}.py:{arg}" if arg is not None else f"{name}.py")
    c.total_steps, c.batch_size, c.log_every_steps, c.checkpoint_every_steps = total_steps, 8, 1, 2
    c.optimizer.warmup_steps = 2
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def free_port() -> int:
    """A free local TCP port, for a jax.distributed coordinator."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    """This process's environment with `devices` fake CPU devices (the suite's XLA_FLAGS
    otherwise)."""
    flags = os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}


def spawn(argv, devices: int):
    """Start `argv` with `devices` fake CPU devices, its stdout and stderr merged into one text
    pipe."""
    import subprocess
    return subprocess.Popen(list(argv), env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def demo(argv) -> tuple[dict, str]:
    """`python -m blip2_jax.demo ARGV --work W` on one CPU device, as a user's machine runs it
    (an 8-device mesh compiles and runs the tiny steps ~15 % slower): (W/results.json, stdout).
    A failure shows the run's last output."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "blip2_jax.demo", *argv], env=_env(1), cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    work = argv[argv.index("--work") + 1]
    with open(os.path.join(work, "results.json")) as f:
        return json.load(f), proc.stdout


def distributed_flags(port: int, process: int, processes: int = 2) -> list:
    """The jax.distributed flags of process `process` of `processes` on this host."""
    return ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
            "--process_id", str(process)]
