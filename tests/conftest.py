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
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# scripts/test.sh runs the files on 2 pytest-xdist workers, whole files in collection order
# (--dist loadfile --no-loadscope-reorder), each worker taking the next file as it finishes.
# xdist's own order (most tests first) left the longest files, which hold few tests, to the end,
# on one worker. These go first, longest first, so that the suite ends on short files and both
# workers finish together; the rest follow in their usual order. (Seconds alone on the 2-core CPU
# machine; test_demo and test_aot run on several threads and slow down most beside another
# worker, so they go earlier than their seconds say.)
LONGEST_FILES = ["test_demo.py",            # 225 s
                 "test_demo_own_data.py",   # 180
                 "test_train.py",           # 205
                 "test_train_run.py",       # 165
                 "test_eval.py",            # 150
                 "test_aot.py",             # 100
                 "test_features.py",        # 115
                 "test_resume.py",          # 80
                 "test_blip2.py",           # 77
                 "test_vqa_ft.py",          # 65
                 "test_sharding.py",        # 50
                 "test_instruct.py",        # 45
                 "test_qformer.py",         # 44
                 "test_convert.py",         # 42
                 "test_inference.py",       # 30
                 "test_generate.py",        # 25
                 "test_lavis_instruct.py",  # 25
                 "test_t5.py",              # 23
                 "test_instructblip.py",    # 20
                 "test_retrieval_eval.py",  # 18
                 "test_flops.py",           # 17
                 "test_configs.py",         # 15
                 "test_data.py"]            # 14
_FILE_ORDER = {name: i for i, name in enumerate(LONGEST_FILES)}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: _FILE_ORDER.get(item.path.name, len(_FILE_ORDER)))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
