"""Test setup: 8 fake CPU devices (sharding tests) and fp32-exact matmuls, before jax is imported."""
import os

# Compiling dominates the suite. Backend optimisation level 0 halves XLA:CPU compile times;
# programs run ~2x slower, which tiny test models do not notice. The CPU backend's legacy
# (non-"fusion emitter") code generation compiles a train step ~2.5x faster again (7 s instead
# of 18 on the 8-device stage-1 step) and runs it no slower; results move by float rounding
# (~1e-7 relative), so parity tolerances are unaffected.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# libtpu (AOT compilation for TPU topologies) lives beside the environment, in .venv/libtpu
# (scripts/test.sh): on the tests' import path and their subprocesses', not the main job's.
_LIBTPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv",
                       "libtpu")
if os.path.isdir(_LIBTPU):
    import sys
    sys.path.append(_LIBTPU)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), _LIBTPU) if p)

# One persistent compilation cache per session: programs compiled again (train.py runs that
# resume, subprocesses) are read back instead of recompiled. pytest-xdist's workers inherit the
# variable, so they share the directory; the process that made it removes it at the end.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="blip2_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
