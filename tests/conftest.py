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
# workers finish together; the rest follow in their usual order. (Seconds in the suite, beside the
# other worker, on the 2-core CPU machine; the demo tests' subprocesses and test_aot's TPU
# compiles run on several threads and slow down most beside another worker, so they go first.)
LONGEST_FILES = ["test_demo.py",            # 77 s
                 "test_demo_own_data.py",   # 78
                 "test_aot.py",             # 126
                 "test_train.py",           # 220
                 "test_train_run.py",       # 153
                 "test_eval.py",            # 102
                 "test_features.py",        # 63
                 "test_blip2.py",           # 62
                 "test_vqa_ft.py",          # 53
                 "test_sharding.py",        # 47
                 "test_resume.py",          # 44
                 "test_convert.py",         # 40
                 "test_qformer.py",         # 38
                 "test_inference.py",       # 33
                 "test_instruct.py",        # 32
                 "test_generate.py",        # 26
                 "test_flops.py",           # 21
                 "test_configs.py",         # 21
                 "test_attention.py",       # 19
                 "test_caption_metrics.py",  # 19
                 "test_instructblip.py",    # 18
                 "test_retrieval_eval.py",  # 14
                 "test_data.py",            # 14
                 "test_t5.py",              # 14
                 "test_llama.py",           # 13
                 "test_lavis_instruct.py"]  # 9
_FILE_ORDER = {name: i for i, name in enumerate(LONGEST_FILES)}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: _FILE_ORDER.get(item.path.name, len(_FILE_ORDER)))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
