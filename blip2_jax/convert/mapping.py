"""Key-mapping tables between our parameter tree and a flat checkpoint (HF, LAVIS, ...).

A table is a list of `Rule`s. One rule maps one leaf of our tree ("/"-joined path) to one source
key, or — for a scanned tower — to one source key per layer, stacked along our leading axis.
`kind` says how the array changes on the way:
  "same"    unchanged
  "linear"  torch Linear weight (out, in)  <->  our Dense kernel (in, out)
  "conv"    torch Conv2d weight (O, I, H, W)  <->  our Conv kernel (H, W, I, O)
Reading fails on any source key no rule consumed (unless `ignore` allows it) and on any key a rule
needs that is absent; writing fails on any leaf of our tree no rule covers.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from blip2_jax.models.blip2 import abstract_params


class MappingError(KeyError):
    """Parameter names do not line up; the message lists every offending name."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str                                  # may contain "{i}" (a source layer index)
    kind: str = "same"
    layers: Optional[tuple[int, ...]] = None     # source layer indices stacked into our axis 0

    def source_keys(self) -> list[str]:
        if self.layers is None:
            return [self.theirs]
        return [self.theirs.format(i=i) for i in self.layers]


def stacked(ours: str, theirs: str, layers: Iterable[int], kind: str = "same") -> Rule:
    return Rule(ours, theirs, kind, tuple(layers))


def linear(ours_prefix: str, theirs_prefix: str, layers=None, bias: bool = True) -> list[Rule]:
    """kernel + bias of one Dense <- `{theirs_prefix}.weight/.bias`."""
    layers = None if layers is None else tuple(layers)
    rules = [Rule(f"{ours_prefix}/kernel", f"{theirs_prefix}.weight", "linear", layers)]
    if bias:
        rules.append(Rule(f"{ours_prefix}/bias", f"{theirs_prefix}.bias", "same", layers))
    return rules


def norm(ours_prefix: str, theirs_prefix: str, layers=None, bias: bool = True,
         scale_name: str = "weight") -> list[Rule]:
    """scale (+ bias) of one LayerNorm/RMSNorm <- `{theirs_prefix}.weight/.bias`."""
    layers = None if layers is None else tuple(layers)
    rules = [Rule(f"{ours_prefix}/scale", f"{theirs_prefix}.{scale_name}", "same", layers)]
    if bias:
        rules.append(Rule(f"{ours_prefix}/bias", f"{theirs_prefix}.bias", "same", layers))
    return rules


# kind -> (source -> ours, ours -> source)
_KINDS = {
    "same": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
}


def _to_ours(kind: str, a: np.ndarray) -> np.ndarray:
    return _KINDS[kind][0](a)


def _to_theirs(kind: str, a: np.ndarray) -> np.ndarray:
    return _KINDS[kind][1](a)


def _set(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a/b/c": leaf} from a nested dict."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        _set(tree, path, v)
    return tree


def load(rules: Sequence[Rule], keys: Iterable[str], get: Callable[[str], np.ndarray], *,
         ignore: Sequence[str] = (), source: str = "checkpoint") -> dict:
    """Our nested param tree from a flat source (`keys` available, `get(key)` reads one).

    `ignore`: regexes of source keys that may be present and are deliberately not loaded
    (buffers, tied duplicates). Missing and unexpected keys raise one MappingError naming all.
    """
    available = set(keys)
    needed = [k for r in rules for k in r.source_keys()]
    missing = sorted(set(needed) - available)
    unexpected = sorted(k for k in available - set(needed)
                        if not any(re.fullmatch(p, k) for p in ignore))
    check_names(f"{source} does not match the model's parameters:",
                [("missing keys", missing), ("unexpected keys", unexpected)])
    flat = {}
    for r in rules:
        arrays = [_to_ours(r.kind, np.asarray(get(k))) for k in r.source_keys()]
        flat[r.ours] = arrays[0] if r.layers is None else np.stack(arrays)
    return unflatten(flat)


def save(rules: Sequence[Rule], params: Mapping) -> dict[str, np.ndarray]:
    """Flat source-format tensors from our param tree; every leaf must be covered by a rule."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    covered = {r.ours for r in rules}
    uncovered = sorted(set(flat) - covered)
    absent = sorted(covered - set(flat))
    check_names("parameter tree does not match the conversion table:",
                [("parameters with no target key", uncovered),
                 ("table entries with no parameter", absent)])
    out = {}
    for r in rules:
        a = flat[r.ours]
        if r.layers is None:
            out[r.theirs] = np.ascontiguousarray(_to_theirs(r.kind, a))
        else:
            if a.shape[0] != len(r.layers):
                raise MappingError(f"{r.ours}: leading axis {a.shape[0]} != {len(r.layers)} layers")
            for j, i in enumerate(r.layers):
                out[r.theirs.format(i=i)] = np.ascontiguousarray(_to_theirs(r.kind, a[j]))
    return out


def check_names(title: str, problems: Sequence[tuple[str, list[str]]]) -> None:
    """Raise one MappingError listing every non-empty (label, names) group under `title`."""
    lines = [f"  {label} ({len(names)}): {_clip(names)}" for label, names in problems if names]
    if lines:
        raise MappingError("\n".join([title] + lines))


def _clip(names: list[str], n: int = 40) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def check_params(cfg, params, source: str = "params") -> None:
    """Raise MappingError unless `params` has exactly the names and shapes `cfg` needs."""
    want = {k: v.shape for k, v in flatten(abstract_params(cfg)).items()}
    have = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(f"{k}: expected {want[k]}, found {have[k]}"
                   for k in set(want) & set(have) if tuple(want[k]) != have[k])
    check_names(f"{source} does not fit the model config:",
                        [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)])
