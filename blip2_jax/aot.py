"""Compile a training config's step for a TPU topology on this machine: no TPU, no weights, no
data (MaxText's `train_compile`). With `libtpu` installed, `jax.experimental.topologies` gives a
topology's devices, and the real jitted step lowers from abstract sharded inputs and compiles.

    python -m blip2_jax.aot --config configs/stage1.py:vit_g --topology v5p-128 \\
        [--program train|generate] [--config.KEY=VALUE ...] [--json OUT.json]

Prints per device: bytes of frozen params, trainable params, optimizer state, the compiler's
temporaries, whether that fits the chip's HBM; the compiler's FLOPs against our counted model
FLOPs (`train/flops.py`); XLA's estimated step time and the MFU it implies. `--program generate`
compiles the beam-search decode program (`config.eval`'s first caption evaluator's settings, or
beam 5 × 30 tokens) for a global batch of `--config.eval.batch_size`.

Topologies: a name of `jax.experimental.topologies` ("v5p:4x4x4") or a pod name (`ALIASES`:
v5p-64, v5p-128, v5e-256, v4-128, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from blip2_jax import api, cli, generate as gen, nn as bnn, sharding as sharding_lib
from blip2_jax.convert.mapping import flatten
from blip2_jax import run_config
from blip2_jax.models.blip2 import abstract_params
from blip2_jax.train import errors
from blip2_jax.train.trainer import Trainer

# Pod name (TensorCores, as Cloud TPU names them) -> topology (chips; v4 counts cores).
ALIASES = {"v5p-8": "v5p:2x2x1", "v5p-64": "v5p:2x4x4", "v5p-128": "v5p:4x4x4",
           "v5p-256": "v5p:4x4x8", "v5e-8": "v5e:2x4", "v5e-256": "v5e:16x16",
           "v4-8": "v4:2x2x1", "v4-128": "v4:4x4x4", "v6e-256": "v6e:16x16"}
GiB = 1024 ** 3
# device_kind -> (HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s) of one chip (Cloud TPU
# datasheets). v4 and v5p are megacore chips: one JAX device per chip, as on a real pod
# (topology_devices).
CHIPS = {"TPU v5": (95 * GiB, 459e12, 2765e9), "TPU v5p": (95 * GiB, 459e12, 2765e9),
         "TPU v5 lite": (16 * GiB, 197e12, 819e9), "TPU v5e": (16 * GiB, 197e12, 819e9),
         "TPU v6 lite": (32 * GiB, 918e12, 1640e9), "TPU v4": (32 * GiB, 275e12, 1228e9)}


class AotError(ValueError):
    """A topology or program this machine cannot compile for (unknown name, no libtpu, a
    generate program without an LLM)."""


# Bad input, reported in one line (cli.report_errors); anything else is a bug.
USER_ERRORS = (AotError, *errors.USER_ERRORS)


def topology_devices(name: str) -> list:
    """The devices of a TPU topology (needs libtpu; nothing runs on them)."""
    # Compiling only: several processes may load libtpu at once (tests, parallel sweeps).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = ALIASES.get(name, name)
    if ":" not in topology:     # neither a pod name nor TYPE:SHAPE; libtpu is not loaded
        raise AotError(f"unknown TPU topology {name!r}: give a pod name ({', '.join(ALIASES)}) "
                       "or a topology TYPE:SHAPE such as v5p:4x4x4")
    # A v4 description defaults to one device per TensorCore, which meshes refuse; real v4 pods
    # run "megacore" (one device per chip, both cores), as v5p does by default.
    chip_config = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, **chip_config)
    except Exception as e:   # libtpu missing or an unknown name: say which
        raise AotError(f"cannot describe TPU topology {name!r} ({topology}): "
                       f"{str(e).splitlines()[0][:300]}; pod names: {sorted(ALIASES)}") from None
    return list(topo.devices)


def chip_spec(device) -> tuple[float, float]:
    """(HBM bytes, peak bf16 FLOP/s) of one device."""
    return CHIPS.get(device.device_kind, (0.0, 0.0, 0.0))[:2]


def hbm_bandwidth(device) -> float:
    """HBM bytes/s of one device (0 if unknown)."""
    return CHIPS.get(device.device_kind, (0.0, 0.0, 0.0))[2]


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(cfg, config, mesh, rules, batch_size: Optional[int] = None) -> dict:
    """ShapeDtypeStructs (sharded on the batch axes) of the global batch `loop.run` feeds: the
    fields `run_config.batch_fields` names, `batch_size` rows (the padded step batch when it
    differs from config.batch_size)."""
    b = int(batch_size or config.batch_size)
    out = {}
    for name, field in run_config.batch_fields(config, cfg).items():
        shape = (b,) + tuple(field.shape)
        out[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(field.dtype),
                                         sharding=sharding_lib.batch_sharding(
                                             mesh, len(shape), b, rules))
    return out


def _trainer(config, cfg, mesh, step_batch: Optional[int] = None) -> Trainer:
    """The Trainer `loop.run` builds, from the config alone (no tokenizers needed: see
    `run_config.text_setup`)."""
    loss = run_config.text_setup(config, cfg, tokenizers=False).loss
    if step_batch is not None:
        loss = dataclasses.replace(loss, masked_rows=step_batch != int(config.batch_size))
    return Trainer(cfg, loss, run_config.section(config, "optimizer"),
                   total_steps=int(config.total_steps), mesh=mesh,
                   **run_config.trainer_options(config))


@dataclasses.dataclass
class Report:
    topology: str
    devices: int
    device_kind: str
    mesh: dict
    program: str
    batch: int
    bytes: dict            # per device: frozen, trainable, optimizer, arguments, temp, output, total
    hbm: float
    fits: bool
    compiler_flops: Optional[float]    # per device, XLA's count of the unrolled program
    model_flops: Optional[float]       # global, counted (train/flops.py)
    estimated_seconds: Optional[float]
    mfu: Optional[float]
    compile_seconds: float
    step_batch: Optional[int] = None   # rows per step when config.pad_batch pads the batch
    xla_seconds: Optional[dict] = None  # XLA's raw time entries (a missing estimate shows here)
    compiler_bytes: Optional[float] = None   # per device, bytes the unrolled program accesses
    peak_flops: float = 0.0                  # per device, bf16
    hbm_bandwidth: float = 0.0               # per device, bytes/s
    # Why there is no estimate though one was asked for (the unrolled copy did not compile).
    estimate_note: Optional[str] = None

    def roofline(self) -> Optional[dict]:
        """Lower bounds on the step time (s) from the compiler's counts: its FLOPs at the
        chip's peak, its memory traffic at the chip's HBM bandwidth."""
        if not (self.compiler_flops and self.compiler_bytes and self.peak_flops
                and self.hbm_bandwidth):
            return None
        return {"flops_at_peak": self.compiler_flops / self.peak_flops,
                "bytes_at_hbm_bandwidth": self.compiler_bytes / self.hbm_bandwidth}

    def table(self) -> str:
        g = lambda x: (f"{x / GiB:.2f} GiB" if x >= GiB / 10            # noqa: E731
                       else f"{x / 1024**2:.1f} MiB")
        b = self.bytes
        lines = [f"{self.program} step, {self.topology}: {self.devices} × {self.device_kind}, "
                 f"mesh {self.mesh}, global batch {self.batch}"
                 + (f" (padded to {self.step_batch} rows per step)"
                    if self.step_batch and self.step_batch != self.batch else ""),
                 f"  per device: frozen params {g(b['frozen'])}, trainable params "
                 f"{g(b['trainable'])}, optimizer state {g(b['optimizer'])}, arguments "
                 f"{g(b['arguments'])}, temporaries {g(b['temp'])}, outputs {g(b['output'])}",
                 f"  total {g(b['total'])} of {g(self.hbm)} HBM: "
                 f"{'fits' if self.fits else 'DOES NOT FIT'}"
                 + ("" if self.fits or b["arguments"] else
                    " (the compiler stopped: these are its temporaries alone)")]
        if self.model_flops:
            compiler = (f"compiler FLOPs {self.compiler_flops:.3e} per device (layers unrolled)"
                        if self.compiler_flops else "no compiler count (no unrolled compile)")
            lines.append(f"  model FLOPs {self.model_flops:.3e} / step (global; "
                         f"{self.model_flops / self.devices:.3e} per device); {compiler}")
        roof = self.roofline()
        if roof:
            lines.append(f"  bounds: compiler FLOPs at peak {1e3 * roof['flops_at_peak']:.1f} ms, "
                         f"its {self.compiler_bytes / GiB:.1f} GiB of HBM traffic at "
                         f"{self.hbm_bandwidth / 1e9:.0f} GB/s "
                         f"{1e3 * roof['bytes_at_hbm_bandwidth']:.1f} ms")
        if self.estimated_seconds:
            mfu = f", estimated MFU {100 * self.mfu:.1f} %" if self.mfu is not None else ""
            lines.append(f"  XLA estimated step time {1e3 * self.estimated_seconds:.1f} ms{mfu}")
        if self.estimate_note:
            lines.append(f"  no XLA estimate: {self.estimate_note}")
        lines.append(f"  compiled in {self.compile_seconds:.1f} s")
        return "\n".join(lines)


def _hbm_oom(message: str) -> Optional[int]:
    """Bytes the TPU compiler said a program needs, from its out-of-HBM error (else None)."""
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    if "RESOURCE_EXHAUSTED" not in message or m is None:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return dict(cost) if isinstance(cost, Mapping) else {}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    get = lambda k: int(getattr(m, k, 0) or 0)                              # noqa: E731
    out = {"arguments": get("argument_size_in_bytes"), "temp": get("temp_size_in_bytes"),
           "output": get("output_size_in_bytes"), "alias": get("alias_size_in_bytes")}
    # Donated inputs alias outputs: the live total counts them once.
    out["total"] = out["arguments"] + out["output"] - out["alias"] + out["temp"]
    return out


def _write_hlo(compiled, path: str) -> None:
    """The optimized HLO text of a compiled program (gzip when `path` ends in .gz). XLA's
    printer can fail on a large program (an INTERNAL RET_CHECK on an async op, seen on the
    stage-1 steps for v5p-128): that is reported, with the way round it (XLA's own dump of the
    compiled module, which bench/hlo_traffic.py reads as well), and the compile's report kept."""
    try:
        text = compiled.as_text()
    except jax.errors.JaxRuntimeError as e:
        print(f"aot: warning: no HLO written to {path}: XLA could not print the program "
              f"({str(e).splitlines()[0][:200]}); XLA_FLAGS='--xla_dump_to=DIR "
              "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step' writes it as "
              "DIR/*jit_step*after_codegen.txt (the largest: the unrolled copy)", file=sys.stderr)
        return
    with (gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w")) as f:
        f.write(text)


def compile_train(config, devices: Sequence[Any], topology: str = "",
                  estimate: bool = True, hlo: Optional[str] = None) -> Report:
    """Lower and compile `loop.run`'s step for `devices` from abstract inputs.

    Memory comes from the program train.py runs (layers scanned). XLA's cost analysis counts a
    loop body once, so with `estimate` the step is compiled a second time with every layer scan
    unrolled (`nn.unrolled_layers`: the same math) for the FLOPs and the estimated step time.
    hlo: write the optimized HLO of the program the numbers come from (the unrolled one with
    `estimate`) to this path, for bench/hlo_traffic.py."""
    cfg = run_config.model_config(config)
    mesh = run_config.make_mesh(config, devices=devices)
    step_batch = run_config.step_batch(config, mesh)
    useful = int(config.batch_size) / step_batch     # padding rows are not model FLOPs
    trainer = _trainer(config, cfg, mesh, step_batch)
    state = trainer.abstract_state()
    frozen = trainer.abstract_frozen()
    batch = abstract_batch(cfg, config, mesh, trainer.rules, step_batch)
    start = time.perf_counter()
    hbm, peak = chip_spec(devices[0])
    sizes = dict(frozen=_per_device_bytes(frozen), trainable=_per_device_bytes(state.params),
                 optimizer=_per_device_bytes(state.opt_state))
    try:
        compiled = trainer.lower(state, frozen, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        oom = _hbm_oom(str(e))
        if oom is None:
            raise
        # The TPU compiler refuses programs that cannot fit: report how much they need.
        memory = dict(sizes, arguments=0, output=0, alias=0, temp=oom, total=oom)
        return Report(topology=topology, devices=len(devices),
                      device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
                      program="train", batch=int(config.batch_size), bytes=memory, hbm=hbm,
                      fits=False, compiler_flops=None,
                      model_flops=trainer.model_flops(batch) * useful,
                      estimated_seconds=None, mfu=None,
                      compile_seconds=time.perf_counter() - start, step_batch=step_batch)
    seconds = time.perf_counter() - start
    memory = _memory(compiled)
    memory.update(sizes)
    cost, note = {}, None
    if estimate:
        with bnn.unrolled_layers():
            start = time.perf_counter()
            try:
                compiled = _trainer(config, cfg, mesh, step_batch).lower(state, frozen,
                                                                          batch).compile()
                cost = _cost(compiled)
            except jax.errors.JaxRuntimeError as e:
                # Without loop boundaries XLA may keep more alive than the program that runs.
                oom = _hbm_oom(str(e))
                if oom is None:
                    raise
                note = (f"the unrolled copy compiled for the estimate needs {oom / GiB:.1f} GiB "
                        f"of temporaries and does not fit (the scanned program above does)")
                compiled = None
            seconds += time.perf_counter() - start
    if hlo and compiled is not None:
        _write_hlo(compiled, hlo)
    model_flops = trainer.model_flops(batch) * useful
    est = cost.get("optimal_seconds")
    est = float(est) if est and est > 0 else None
    mfu = (model_flops / (len(devices) * peak * est)) if est and peak else None
    return Report(topology=topology, devices=len(devices), device_kind=devices[0].device_kind,
                  mesh=dict(mesh.shape), program="train", batch=int(config.batch_size),
                  bytes=memory, hbm=hbm, fits=bool(hbm) and memory["total"] <= hbm,
                  compiler_flops=cost.get("flops"), model_flops=model_flops,
                  estimated_seconds=est, mfu=mfu, compile_seconds=seconds,
                  step_batch=step_batch,
                  xla_seconds={k: float(v) for k, v in cost.items() if "second" in k},
                  compiler_bytes=cost.get("bytes accessed"), peak_flops=peak,
                  hbm_bandwidth=hbm_bandwidth(devices[0]), estimate_note=note)


def sharding_table(config, devices: Sequence[Any]) -> dict:
    """The named sharding of every parameter (trainable or frozen) and batch field of a config
    on `devices`: what the golden files under tests/golden/sharding/ hold."""
    cfg = run_config.model_config(config)
    mesh = run_config.make_mesh(config, devices=devices)
    trainer = _trainer(config, cfg, mesh)
    spec = lambda s: str(tuple(s.spec))                                         # noqa: E731
    params = {k: {"shape": list(v.shape), "trainable": True} for k, v in
              flatten(trainer.trainable_shapes).items()}
    params.update({k: {"shape": list(v.shape), "trainable": False} for k, v in
                   flatten(trainer.frozen_shapes).items()})
    shardings = {**flatten(trainer.trainable_shardings), **flatten(trainer.frozen_shardings)}
    for k in params:
        params[k]["sharding"] = spec(shardings[k])
    batch = abstract_batch(cfg, config, mesh, trainer.rules, run_config.step_batch(config, mesh))
    return {"mesh": dict(mesh.shape), "params": dict(sorted(params.items())),
            "batch": {k: {"shape": list(v.shape), "sharding": spec(v.sharding)}
                      for k, v in sorted(batch.items())}}


def compile_generate(config, devices: Sequence[Any], topology: str = "",
                     hlo: Optional[str] = None) -> Report:
    """Compile the beam-search caption program (prefill + decode loop) for `devices`; `hlo`:
    also write its optimized HLO there."""
    cfg = run_config.model_config(config)
    if cfg.llm is None:
        raise AotError("--program generate needs a model with an LLM (a stage-2 config)")
    eval_cfg = run_config.section(config, "eval")
    settings = next((e for e in (eval_cfg.get("evaluators") or {}).values()
                     if e.get("kind") == "caption"), {})
    llm = cfg.llm
    opts = gen.DecodeOptions(max_new_tokens=int(settings.get("max_new_tokens", 30)),
                             num_beams=int(settings.get("num_beams", 5)),
                             eos_token_ids=(int(llm.eos_token_id),),
                             pad_token_id=int(llm.pad_token_id if llm.pad_token_id is not None
                                              else llm.eos_token_id))
    knobs = gen.make_knobs(opts, min_new_tokens=int(settings.get("min_new_tokens", 0)),
                           length_penalty=float(settings.get("length_penalty", 1.0)))
    mesh = run_config.make_mesh(config, devices=devices)
    dtype = eval_cfg.get("dtype") or "bfloat16"
    cfg = cfg.with_dtypes(dtype)
    shardings = sharding_lib.param_shardings(cfg, mesh)
    shapes = abstract_params(cfg)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    b = int(eval_cfg.get("batch_size") or 32)
    size = cfg.vision.image_size
    prompt = api.PROMPT_BUCKET
    model = api.Blip2(cfg, params, check=False)
    program = jax.jit(model._generate_program(opts, (b, size, size, 3), (b, prompt)))
    batch = lambda shape, dt: jax.ShapeDtypeStruct(                           # noqa: E731
        shape, dt, sharding=sharding_lib.batch_sharding(mesh, len(shape), shape[0]))
    args = (params, batch((b, size, size, 3), jnp.float32), batch((b, prompt), jnp.int32),
            batch((b, prompt), jnp.int32), knobs)
    start = time.perf_counter()
    compiled = program.lower(*args).compile()
    seconds = time.perf_counter() - start
    if hlo:
        _write_hlo(compiled, hlo)
    memory = _memory(compiled)
    memory.update(frozen=_per_device_bytes(params), trainable=0, optimizer=0)
    cost = _cost(compiled)
    hbm, _ = chip_spec(devices[0])
    return Report(topology=topology, devices=len(devices), device_kind=devices[0].device_kind,
                  mesh=dict(mesh.shape), program="generate", batch=b, bytes=memory, hbm=hbm,
                  fits=bool(hbm) and memory["total"] <= hbm, compiler_flops=cost.get("flops"),
                  model_flops=None, estimated_seconds=None, mfu=None, compile_seconds=seconds)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`argv` as sys.argv: the program name first. Flags: blip2_jax/cli.py's convention."""
    argv = list(sys.argv if argv is None else argv)
    p = cli.ArgumentParser(prog="python -m blip2_jax.aot", description=__doc__.split("\n\n")[0],
                           config=True, lock_config=False)
    p.add_argument("--topology", required=True, help="TPU topology (v5p:4x4x4) or pod name "
                   f"({', '.join(ALIASES)})")
    p.add_argument("--program", choices=("train", "generate"), default="train",
                   help="what to compile (default: train)")
    p.add_argument("--json", metavar="OUT.json", help="also write the report as JSON here")
    p.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=True,
                   help="also compile with layers unrolled for XLA's FLOPs and step-time "
                        "estimate (slower; default: on)")
    p.add_argument("--hlo", metavar="PATH", help="also write the optimized HLO here (train: the "
                   "unrolled program with --estimate); .gz compresses")
    cli.add_verbose_argument(p)
    args = p.parse_args(argv[1:])
    return cli.report_errors(p.prog, lambda: _compile_and_report(args), USER_ERRORS,
                             args.verbose)


def _compile_and_report(args: argparse.Namespace) -> None:
    devices = topology_devices(args.topology)
    if args.program == "train":
        report = compile_train(args.config, devices, args.topology, args.estimate, hlo=args.hlo)
    else:
        report = compile_generate(args.config, devices, args.topology, hlo=args.hlo)
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(dataclasses.asdict(report), roofline=report.roofline()), f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
