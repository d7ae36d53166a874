"""AOT compilation for TPU topologies (libtpu, no TPU): the tiny configs compile for a small
v5p topology, so the path train.py runs on a pod cannot rot; memory and cost reports are sane."""
import os
import subprocess
import sys

import jax
import pytest

from blip2_jax import aot
from blip2_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5p:2x2x1"        # 4 v5p chips


def _config(name, arg=None, **overrides):
    c = run_config.load(f"{name}.py:{arg}" if arg is not None else f"{name}.py")
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


# tests/conftest.py's XLA_FLAGS hold a flag only XLA:CPU knows; libtpu reads XLA_FLAGS at its
# first compile and aborts on a flag it does not know. The CPU backend has read them by then
# (the computation below makes sure), so libtpu is shown them without it.
CPU_ONLY_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


@pytest.fixture(scope="module", autouse=True)
def _xla_flags_libtpu_reads():
    jax.block_until_ready(jax.numpy.zeros(2) + 1)
    before = os.environ.get("XLA_FLAGS")
    if before is not None:
        os.environ["XLA_FLAGS"] = " ".join(f for f in before.split() if f not in CPU_ONLY_FLAGS)
    yield
    if before is not None:
        os.environ["XLA_FLAGS"] = before


@pytest.fixture(scope="module", autouse=True)
def _compile_each_program_once():
    """TPU compiles are the cost of this module (~30 s for a tiny step, twice that unrolled) and
    the persistent compilation cache cannot read them back (no TPU client). A program lowered to
    the same text (for the same TOPOLOGY devices: every compile here) is compiled once."""
    real = jax.stages.Lowered.compile
    compiled = {}

    def compile_once(self, *args, **kwargs):
        key = (self.as_text(), repr(args), repr(sorted(kwargs.items())))
        if key not in compiled:
            compiled[key] = real(self, *args, **kwargs)
        return compiled[key]
    jax.stages.Lowered.compile = compile_once
    yield
    jax.stages.Lowered.compile = real


@pytest.fixture(scope="module")
def devices():
    return aot.topology_devices(TOPOLOGY)


# Stage 1 sharded two ways (the ITC features are all-gathered; ITM reuses the query pass's image
# K/V and fetches the hard-negative images from other chips, as the paper configs do), batch 8:
# 2 rows per chip. The unrolled-copy test compiles the same scanned program (compiled once,
# above).
STAGE1 = dict(mesh=dict(data=2, fsdp=2, tensor=1), batch_size=8,
              loss=dict(itc=1.0, itm=1.0, itg=1.0, itm_image_kv_once=True))


def test_pod_names_map_to_topologies(devices):
    assert len(devices) == 4 and devices[0].device_kind.startswith("TPU v5")
    hbm, peak = aot.chip_spec(devices[0])
    assert hbm == 95 * aot.GiB and peak == 459e12
    assert len(aot.topology_devices("v5p-128")) == 64        # 128 TensorCores = 64 megacores


def test_v4_pods_are_megacore():
    # One device per chip, as a v4 pod runs: a per-TensorCore description cannot make a mesh.
    from blip2_jax.sharding import make_mesh
    v4 = aot.topology_devices("v4-128")
    assert len(v4) == 64 and v4[0].device_kind == "TPU v4"
    assert aot.chip_spec(v4[0]) == (32 * aot.GiB, 275e12)
    assert make_mesh(dict(data=16, fsdp=1, tensor=4), devices=v4).devices.size == 64


@pytest.mark.slow
def test_stage1_step_compiles_with_reports(devices, tmp_path):
    c = _config("tiny_stage1", **STAGE1)
    hlo = str(tmp_path / "step.hlo.gz")
    report = aot.compile_train(c, devices, TOPOLOGY, hlo=hlo)
    assert report.mesh == {"data": 2, "fsdp": 2, "tensor": 1} and report.fits
    b = report.bytes
    assert 0 < b["trainable"] and 0 < b["frozen"] and b["optimizer"] >= 2 * b["trainable"] * 0.9
    assert b["total"] >= b["arguments"] > 0
    # Layers unrolled for the estimate: XLA counts at least every counted matmul FLOP (it also
    # counts elementwise work); with scanned layers it would count one layer per tower.
    assert report.compiler_flops * report.devices >= 0.9 * report.model_flops
    assert report.estimated_seconds > 0 and 0 < report.mfu < 1
    # The estimate is no faster than the compiler's own FLOP and HBM-traffic bounds.
    roof = report.roofline()
    assert report.compiler_bytes > 0 and report.hbm_bandwidth == 2765e9
    assert report.estimated_seconds >= 0.99 * max(roof.values()) > 0
    assert "fits" in report.table() and "HBM traffic" in report.table()
    # bench/hlo_traffic.py reads the unrolled program: every Q-Former pass, forward and
    # backward, and the collectives of the sharded step (the ITC features are gathered).
    import gzip
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import hlo_traffic
    with gzip.open(hlo, "rt") as f:
        groups, comms = hlo_traffic.traffic(f.read())
    for method in ("query_output", "text_features", "itm_logits", "itg_logits"):
        for direction in ("fwd", "bwd"):
            assert any(k.startswith(f"{direction} Blip2Module.{method}/qformer/layer_*")
                       for k in groups), (method, direction, sorted(groups))
    assert any(kind == "all-gather" for kind, _ in comms)
    assert sum(g[1] for g in groups.values()) > b["trainable"]
    # The compiler's estimated cycles are read per op, the ViT's forward among them.
    assert sum(g[2] for g in groups.values()) > 0
    assert any(k.startswith("fwd vision") and g[2] > 0 for k, g in groups.items())


@pytest.mark.slow
def test_stage2_microbatched_and_generate_compile(devices, tmp_path):
    c = _config("tiny_stage2", "opt", microbatches=2)
    report = aot.compile_train(c, devices, TOPOLOGY)
    # The microbatch loop is unrolled for the estimate too: XLA counts both microbatches.
    assert report.fits and report.compiler_flops * report.devices >= 0.9 * report.model_flops
    report = aot.compile_train(c, devices, TOPOLOGY, estimate=False)
    assert report.fits and report.estimated_seconds is None and report.compiler_flops is None
    assert "no compiler count (no unrolled compile)" in report.table()
    hlo = tmp_path / "generate.hlo"
    gen = aot.compile_generate(_config("tiny_stage2", "opt"), devices, TOPOLOGY, hlo=str(hlo))
    assert gen.program == "generate" and gen.fits and gen.bytes["frozen"] > 0
    # bench/hlo_traffic.py --loops: the decode loop (max_new_tokens trips) with the LLM's
    # layer scan inside, whose iterations its per-step total includes.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import hlo_traffic
    loops = hlo_traffic.loops(hlo.read_text())
    [(trip, own, total)] = [(trip, own, total) for op_name, trip, own, total, _ in loops
                            if op_name.endswith("decode_program)/while")]
    [layer_scan] = [(trip, own) for op_name, trip, own, _, _ in loops
                    if "decode_step/llm/" in op_name]
    assert trip == 12 and total == own + layer_scan[0] * layer_scan[1] and own > 0
    # Data parallel only: no chip needs another's data. (Reordering the beams over the flat
    # batch x beams axis all-gathered the KV cache every step.)
    assert "all-gather" not in hlo.read_text()


def test_cli_reports_and_errors(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad = subprocess.run([sys.executable, "-m", "blip2_jax.aot",
                          f"--config={ROOT}/configs/tiny_stage1.py", "--topology=v9z:1x1"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines()
              if line.startswith("python -m blip2_jax.aot: error:")]
    assert len(errors) == 1 and "v9z" in errors[0] and "invalid" in errors[0].lower(), errors


def test_an_unrolled_copy_that_does_not_fit_keeps_the_memory_report(devices, monkeypatch):
    """The estimate's unrolled copy can need more HBM than the scanned program that runs: the
    report keeps the program's memory and says why there is no estimate."""
    from blip2_jax import nn as bnn
    from blip2_jax.train.trainer import Trainer
    real = Trainer.lower

    class TooBig:
        def compile(self):
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the "
                "total memory required for HLO temporaries (97.50G) exceeds available HBM")

    def lower(self, *args):
        return TooBig() if bnn.scan_unroll(2) == 2 else real(self, *args)
    monkeypatch.setattr(Trainer, "lower", lower)
    report = aot.compile_train(_config("tiny_stage1", **STAGE1), devices, TOPOLOGY)
    assert report.fits and report.bytes["total"] > 0 and report.estimated_seconds is None
    assert "97.5 GiB" in report.estimate_note and "no XLA estimate" in report.table()


def test_every_pod_setting_makes_a_mesh_of_its_pod_that_takes_the_batch():
    """Each POD_SETTINGS entry, applied by its config (`stage1.py:vit_g,v5p-64`), uses every
    chip of its pod and a batch the mesh's batch axes and microbatches divide (padded where it
    says so)."""
    from blip2_jax.train import defaults
    for (key, pod), setting in sorted(defaults.POD_SETTINGS.items()):
        stage, arg = key.split(":")
        c = _config(stage, f"{arg},{pod}")
        devices = aot.topology_devices(pod)
        mesh = run_config.make_mesh(c, devices=devices)
        assert mesh.devices.size == len(devices), (key, pod)
        rows = run_config.step_batch(c, mesh)
        assert rows >= c.batch_size and rows - c.batch_size < mesh.devices.size, (key, pod)
        assert (rows == c.batch_size) or setting.get("pad_batch"), (key, pod)
        # Each device's rows split evenly into the microbatches (train/step.py).
        assert rows % (mesh.devices.size // mesh.shape["tensor"] * c.microbatches) == 0, key


def test_a_program_xla_cannot_print_says_how_to_dump_it(tmp_path, capsys):
    """XLA's printer fails on some large programs (the stage-1 steps for v5p-128): no file is
    written, and the warning names XLA's own dump, which bench/hlo_traffic.py reads."""
    class Unprintable:
        def as_text(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: RET_CHECK failure: async-update")
    path = tmp_path / "step.hlo.gz"
    aot._write_hlo(Unprintable(), str(path))
    assert not path.exists()
    err = capsys.readouterr().err
    assert "no HLO written" in err and "RET_CHECK" in err and "--xla_dump_to=" in err
