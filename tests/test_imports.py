"""The package's imports flow one way, read from the source (nothing is imported).

Layers, bottom to top; a module may import its own layer and the layers below it:

    foundations   config, nn, cli
    models        models/
    components    losses, generate, processing, sharding, convert/, checkpoint, metrics/, data/
    model         api (the `Blip2` object: surfaces, load, save, shard)
    evaluation    eval/
    run config    run_config (a run's config → model config, mesh, rules, texts, losses, batch)
    training      train/
    entry points  aot, predict, demo, the package's __init__

Also: no import cycle between modules (function-local imports included), and an import inside a
function says why it is there (a comment on its line or the line above: an optional dependency,
start-up time).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blip2_jax")

LAYERS = [
    ("foundations", ["config", "nn", "cli"]),
    ("models", ["models"]),
    ("components", ["losses", "generate", "processing", "sharding", "convert", "checkpoint",
                    "metrics", "data"]),
    ("model", ["api"]),
    ("evaluation", ["eval"]),
    ("run config", ["run_config"]),
    ("training", ["train"]),
    ("entry points", ["aot", "predict", "demo", ""]),
]


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3]
                name = rel.replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = os.path.join(d, f)
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    """The index in LAYERS of a module (its longest matching prefix)."""
    rel = module.removeprefix("blip2_jax").removeprefix(".")
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if rel == p or (p and rel.startswith(p + ".")):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to tests/test_imports.py LAYERS")
    return best[0]


class _Imports(ast.NodeVisitor):
    """(imported module, line, function-local) of every import in a module."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.depth = 0
        self.found: list[tuple[str, int, bool]] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        for a in node.names:
            self.found.append((a.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node):
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module
        for a in node.names:
            sub = f"{base}.{a.name}"
            self.found.append((sub if sub in MODULES else base, node.lineno, self.depth > 0))


def _imports(module: str) -> list[tuple[str, int, bool]]:
    path = MODULES[module]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    v = _Imports(module, path.endswith("__init__.py"))
    v.visit(tree)
    return v.found


def _edges() -> dict[str, set[str]]:
    """module -> the package modules it imports (the package's own __init__ excluded: importing
    any submodule runs it, so it is no edge of the importer's choosing)."""
    out = {}
    for m in MODULES:
        out[m] = {t for t, _, _ in _imports(m)
                  if t.startswith("blip2_jax.") and t in MODULES and t != m}
    return out


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_upward_import():
    upward = []
    for m, targets in _edges().items():
        for t in targets:
            if layer_of(t) > layer_of(m):
                upward.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} "
                              f"({LAYERS[layer_of(t)][0]})")
    assert not upward, "imports that go up a layer:\n  " + "\n  ".join(sorted(upward))


def test_no_import_cycle():
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_function_local_imports_say_why():
    silent = []
    for m, path in MODULES.items():
        with open(path) as f:
            lines = f.read().splitlines()
        for target, line, local in _imports(m):
            if not local:
                continue
            here, above = lines[line - 1], lines[line - 2] if line > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                silent.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line} "
                              f"imports {target}")
    assert not silent, ("imports inside functions without a comment saying why (optional "
                        "dependency, start-up time):\n  " + "\n  ".join(sorted(silent)))


def test_the_checks_fail_on_a_bad_graph(monkeypatch, tmp_path):
    """The checks can fail: a component importing the training loop is an upward edge."""
    assert layer_of("blip2_jax.data.pipeline") < layer_of("blip2_jax.train.loop")
    assert layer_of("blip2_jax.api") < layer_of("blip2_jax.train.loop")
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from blip2_jax.train import loop\n")
    monkeypatch.setitem(MODULES, "blip2_jax.data.bad", str(bad))
    with pytest.raises(AssertionError, match="blip2_jax.data.bad .components. imports "
                                             "blip2_jax.train.loop"):
        test_no_upward_import()
    with pytest.raises(AssertionError, match="blip2_jax/data/bad.py|bad.py:2"):
        test_function_local_imports_say_why()
