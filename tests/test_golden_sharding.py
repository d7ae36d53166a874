"""Golden sharding files (MaxText style): the named sharding of every parameter and batch field
of the paper's configs (and stage 2 with LLaMA-3-8B) on a v5p-128 mesh (their pod settings), so that a change of sharding is a
visible diff. Regenerate after an intended change with

    UPDATE_GOLDEN=1 python -m pytest tests/test_golden_sharding.py
"""
import json
import os

import pytest

from blip2_jax import aot, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "sharding")
POD = "v5p-128"
PAPER = [("stage1", "vit_g"), ("stage1", "vit_l"), ("stage2", "opt-2.7b"),
         ("stage2", "opt-6.7b"), ("stage2", "flant5-xl"), ("stage2", "flant5-xxl"),
         ("stage2", "llama3-8b")]


def _config(name, arg):
    return run_config.load(f"{name}.py:{arg},{POD}")


@pytest.fixture(scope="module")
def devices():
    return aot.topology_devices(POD)


@pytest.mark.parametrize("name,arg", PAPER, ids=[f"{n}:{a}" for n, a in PAPER])
def test_sharding_matches_golden(devices, name, arg):
    table = aot.sharding_table(_config(name, arg), devices)
    path = os.path.join(GOLDEN, f"{name}_{arg}_{POD}.json")
    if os.environ.get("UPDATE_GOLDEN"):
        with open(path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(path) as f:
        golden = json.load(f)
    assert table["mesh"] == golden["mesh"]
    for part in ("params", "batch"):
        changed = sorted(k for k in set(table[part]) | set(golden[part])
                         if table[part].get(k) != golden[part].get(k))
        assert not changed, (f"{name}:{arg} {part} sharding changed (UPDATE_GOLDEN=1 to accept): "
                             + "; ".join(f"{k}: {golden[part].get(k)} -> {table[part].get(k)}"
                                         for k in changed[:20]))
