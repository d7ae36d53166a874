"""Where a compiled step's HBM traffic goes: the top-level ops of an optimized HLO program
(`python -m blip2_jax.aot ... --hlo step.hlo.gz`, the layers unrolled), grouped by the JAX
source path in their metadata.

    python bench/hlo_traffic.py step.hlo.gz [--top 30] [--depth 3]
    python bench/hlo_traffic.py generate.hlo.gz --loops
    python bench/hlo_traffic.py DIR/module_NNNN.jit_step.*.after_codegen.txt   # XLA's dump

XLA's printer fails on some large programs (`aot` then writes no --hlo and says so); XLA's own
dump of the compiled module has the same text (`XLA_FLAGS='--xla_dump_to=DIR
--xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step'` on the `aot` command; the largest
`after_codegen.txt` is the unrolled copy).

`--loops` lists a program's while loops instead (the decode loop of `aot --program generate`
and the layer scans in it): trip count, and the compiler's estimated cycles of one iteration,
its own ops and with its nested loops (a decode step, layers included).

Each top-level op (a fusion, a collective, a copy, a custom call) is charged the bytes of its
operands and of its result (a slice: twice its result): an upper bound on what it reads and
writes — a fusion that slices one layer out of stacked weights is charged the whole stack, so
compare groups, not the total with XLA's own count, which `aot` prints.
Ops are grouped by `op_name` with the transformations folded into a direction (fwd, or bwd for
`transpose(...)`) and layer indices dropped, so the 12 Q-Former layers of one pass add up.
Collectives are listed apart with the bytes they move. Printed per group: ops, GiB, the
milliseconds that traffic takes at --bandwidth (default v5p's 2765 GB/s), and the TPU
compiler's own time model: the `estimated_cycles` it records on each op (M cycles, and their
share of the program's), which is what its step-time estimate is built from — the column to
sort work by (`--by cycles`, the default; `--by bytes`).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
        "partition-id", "replica-id", "iota", "opt-barrier"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")
_WRAPPERS = re.compile(r"^(?:(?:jit|jvp|transpose|vmap|remat|checkpoint|pjit)\()+")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (an array or a tuple of arrays)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """(shape, the text after it) of an instruction's right-hand side."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape '(a, (b, c), d)'."""
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if (ch == "," and depth == 1) or (depth == 0 and i == len(shape) - 1):
            parts.append(shape[start:i].strip())
            start = i + 1
    return parts


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def computations(text: str) -> dict:
    """{name: its instruction lines} of every computation; the ENTRY one also under "ENTRY"."""
    comps: dict = {}
    lines = None
    for line in text.splitlines():
        m = None if line.startswith((" ", "}")) else _COMPUTATION.match(line)
        if m:
            lines = comps[m.group(2)] = []
            if m.group(1):
                comps["ENTRY"] = lines
        elif line.startswith("}"):
            lines = None
        elif lines is not None and line.strip():
            lines.append(line)
    return comps


def _ops(lines):
    for line in lines:
        m = _DEF.match(line)
        if not m:
            continue
        shape, tail = _split_shape(line[m.end():])
        opcode, _, args = tail.partition("(")
        depth, end = 1, 0
        for end, ch in enumerate(args):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        operands = re.findall(r"%([\w.\-]+)", args[:end])
        meta = re.search(r'op_name="([^"]*)"', line)
        cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
        yield (m.group(1), shape, opcode.strip(), operands, meta.group(1) if meta else "",
               int(cycles.group(1)) if cycles else 0)


def entry_ops(text: str):
    """(name, shape, opcode, operand names, op_name, the compiler's estimated cycles or 0) of
    each instruction of the ENTRY computation."""
    return _ops(computations(text)["ENTRY"])


def loops(text: str) -> list:
    """Every while loop of a program (`aot --program generate --hlo`: the decode loop and the
    layer scans in it): (op_name, trip count from its condition's `< constant` or None, the
    compiler's estimated cycles of one iteration's own ops, the same with its nested loops
    (their trips x their cycles; None when a trip count is unknown), the computation the loop
    sits in)."""
    comps = computations(text)
    found = []                                   # (op_name, trip, body, parent)
    for parent, lines in comps.items():
        if parent == "ENTRY":
            continue
        for line in lines:
            if " while(" not in line:
                continue
            cond = re.search(r"condition=%([\w.\-]+)", line).group(1)
            body = re.search(r"body=%([\w.\-]+)", line).group(1)
            meta = re.search(r'op_name="([^"]*)"', line)
            bounds = re.findall(r"= s32\[\]\S* constant\((\d+)\)", "\n".join(comps[cond]))
            less = any("direction=LT" in l for l in comps[cond])
            found.append((meta.group(1) if meta else "", int(bounds[0]) if len(bounds) == 1
                          and less else None, body, parent))
    own = {body: sum(c for *_, c in _ops(comps[body])) for _, _, body, _ in found}

    def total(body):
        inner = [(trip, b) for _, trip, b, parent in found if parent == body]
        if any(trip is None for trip, _ in inner):
            return None
        nested = [total(b) for _, b in inner]
        return None if None in nested else \
            own[body] + sum(trip * t for (trip, _), t in zip(inner, nested))
    return [(op_name, trip, own[body], total(body), parent)
            for op_name, trip, body, parent in found]


def group_of(op_name: str, depth: int) -> str:
    """'bwd Blip2Module.itm_logits/qformer/layer_*' from an op_name (depth 3)."""
    if not op_name:
        return "(no source)"
    direction = "bwd" if "transpose(" in op_name else "fwd"
    parts = []
    for p in op_name.split("/"):
        p = _WRAPPERS.sub("", p).rstrip(")")            # jvp(transpose(vision)) -> vision
        if p in ("step", "", "closed_call", "layers", "checkpoint") or p.startswith("_"):
            continue
        parts.append(re.sub(r"_\d+$", "_*", p))
    return f"{direction} " + "/".join(parts[:depth])


def traffic(text: str, depth: int = 4):
    """({group: [ops, bytes, cycles]}, {(collective, group): [ops, bytes]})."""
    size: dict[str, float] = {}
    groups: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0])
    comms: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, shape, opcode, operands, op_name, cycles in entry_ops(text):
        size[name] = shape_bytes(shape)
        if opcode in FREE or opcode.endswith("-done"):
            continue
        if opcode.endswith("-start") and shape.startswith("("):
            # An async start's tuple is (its operands, its result, context...): the result is
            # what is written.
            parts = _tuple_elements(shape)
            size[name] = shape_bytes(parts[1]) if len(parts) > 1 else shape_bytes(shape)
        base = opcode.removesuffix("-start")
        if base in ("slice", "dynamic-slice"):
            moved = 2 * size[name]          # reads what it writes, not its whole operand
        else:
            moved = size[name] + sum(size.get(o, 0.0) for o in operands)
        key = group_of(op_name, depth)
        if base in COLLECTIVES:
            comms[(base, key)][0] += 1
            comms[(base, key)][1] += size[name]
        groups[key][0] += 1
        groups[key][1] += moved
        groups[key][2] += cycles
    return groups, comms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hlo", help="optimized HLO text (aot --hlo), .gz allowed")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--depth", type=int, default=4, help="source-path components per group")
    p.add_argument("--bandwidth", type=float, default=2765e9, help="HBM bytes/s")
    p.add_argument("--by", choices=("cycles", "bytes"), default="cycles", help="sort groups by")
    p.add_argument("--loops", action="store_true",
                   help="list the while loops instead: trip count and cycles per iteration")
    args = p.parse_args(argv)
    opener = gzip.open if args.hlo.endswith(".gz") else open
    with opener(args.hlo, "rt") as f:
        text = f.read()
    if args.loops:
        print("| loop (op_name) | trips | M cycles per iteration: own ops | with nested loops "
              "| in |\n|---|---|---|---|---|")
        for op_name, trip, cycles, total, parent in loops(text):
            print(f"| {op_name} | {'?' if trip is None else trip} | {cycles / 1e6:.2f} | "
                  f"{'?' if total is None else f'{total / 1e6:.2f}'} | {parent} |")
        return 0
    groups, comms = traffic(text, args.depth)
    total = sum(g[1] for g in groups.values())
    cycles = sum(g[2] for g in groups.values()) or 1
    gib = 1024 ** 3
    print(f"top-level HBM traffic {total / gib:.1f} GiB per device "
          f"({1e3 * total / args.bandwidth:.1f} ms at {args.bandwidth / 1e9:.0f} GB/s); "
          f"the compiler's estimated cycles {cycles / 1e6:.1f} M")
    print("| group | ops | GiB | ms at bandwidth | M cycles | cycle share |\n"
          "|---|---|---|---|---|---|")
    column = 2 if args.by == "cycles" else 1
    for key, (n, b, c) in sorted(groups.items(), key=lambda kv: -kv[1][column])[:args.top]:
        print(f"| {key} | {n} | {b / gib:.2f} | {1e3 * b / args.bandwidth:.2f} | "
              f"{c / 1e6:.2f} | {100 * c / cycles:.1f} % |")
    if comms:
        print("\n| collective | group | ops | GiB (result) |\n|---|---|---|---|")
        for (kind, key), (n, b) in sorted(comms.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"| {kind} | {key} | {n} | {b / gib:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
