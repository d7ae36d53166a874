"""Offline HTML report of an evaluation run, plus PNG plots of training curves.

    html_path = write_report(out_dir, results, title=..., metrics_jsonl=..., info=...)

Writes `out_dir/report.html` and its images under `out_dir/report_files/` (example thumbnails as
JPEG, training curves as PNG). The page has no JavaScript and no external URL: every image is a
file next to it, referenced by a relative path, so the directory can be copied or zipped as is.

`results` holds one dict per evaluator, in page order:
    {"name": str, "kind": "caption" | "vqa" | "retrieval",
     "metrics": {name: number | str}, "examples": ...}
with kind-specific examples (images are encoded bytes or uint8 (H, W, 3) arrays):
    caption:   [{"id", "image", "prediction", "references": [str]}]
    vqa:       [{"id", "image", "question", "prediction", "answers": [str], "score": float}]
    retrieval: {"i2t": [{"id", "image", "top": [{"text", "score", "correct"}]}],
                "t2i": [{"id", "text", "top": [{"image", "id", "score", "correct"}]}]}

Pure Python + Pillow; matplotlib (Agg, no pyplot) is imported only to plot training curves.
"""
from __future__ import annotations

import collections
import html
import io
import json
import math
import numbers
import os
import re
from typing import Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["write_report", "plot_training_curves"]

_FILES_DIR = "report_files"
_TOP_K = 5
# The summary's headline metric: the first of these that is numeric, else the first numeric one.
_MAIN_METRICS = ("CIDEr", "agg_metrics", "accuracy", "r_mean")

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .3em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin: 1em 0 .4em; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.examples td { max-width: 420px; }
.thumb { display: block; max-width: 100%; }
.noimg { display: inline-block; padding: 4px; font-size: .85em; color: #a00;
         border: 1px dashed #a00; max-width: 160px; word-break: break-word; }
.pred { font-weight: bold; }
ul.refs, ol.top { margin: 0; padding-left: 1.3em; }
.muted { color: #777; font-size: .9em; }
tr.correct > td:first-child { border-left: 5px solid #2a2; }
tr.partial > td:first-child { border-left: 5px solid #d90; }
tr.wrong > td:first-child { border-left: 5px solid #c22; }
.acc { font-weight: 600; }
tr.correct .acc { color: #170; } tr.partial .acc { color: #a60; } tr.wrong .acc { color: #b11; }
li.hit { color: #170; font-weight: 600; }
.row { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; padding: 3px; border: 3px solid transparent; text-align: center;
         font-size: .85em; }
figure.hit { border-color: #2a2; }
figure.hit figcaption { color: #170; font-weight: 600; }
.curves img { max-width: 100%; border: 1px solid #ddd; margin: .3em 0; }
"""


# ----------------------------------------------------------------------------- formatting

def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value) -> bool:
    # bool is an int subclass, but True is not a metric value worth formatting as 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt_number(value) -> str:
    """Compact: ints as is, floats with 4 significant digits (no exponent below 1e15)."""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e4 and abs(value) < 1e15:      # 12345.6 -> "12346", not "1.235e+04"
        return f"{value:.0f}"
    return f"{value:.4g}"


def _fmt_value(value) -> str:
    """Escaped html for a metric value: numbers formatted, anything else as text."""
    return _esc(_fmt_number(value)) if _is_number(value) else _esc(value)


def _fmt_percent(score) -> str:
    pct = 100.0 * float(score)
    return f"{pct:.0f}%" if abs(pct - round(pct)) < 0.05 else f"{pct:.1f}%"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or "eval"


def _main_metric(metrics: dict):
    """(name, value) of the summary's headline metric, or (None, None)."""
    for key in _MAIN_METRICS:
        if _is_number(metrics.get(key)):
            return key, metrics[key]
    for key, value in metrics.items():
        if _is_number(value):
            return key, value
    return None, None


# ----------------------------------------------------------------------------- images

class _Thumbnails:
    """Writes example thumbnails into `files_dir`; names are `{evaluator}_{n}.jpg` with one counter
    per report, so two evaluators whose names sanitize alike cannot overwrite each other."""

    def __init__(self, files_dir: str, size: int):
        self.files_dir, self.size = files_dir, int(size)
        self.count = 0

    def img_tag(self, image, prefix: str, alt: str = "") -> str:
        """An <img> for `image` (bytes / uint8 array / PIL image), or a placeholder on failure."""
        try:
            pil = _to_pil(image)
            pil.thumbnail((self.size, self.size))
            filename = f"{prefix}_{self.count}.jpg"
            self.count += 1
            pil.save(os.path.join(self.files_dir, filename), "JPEG", quality=90)
        except Exception as e:  # noqa: BLE001 - one bad image must not cost the whole report
            if isinstance(e, UnidentifiedImageError):   # its message embeds a BytesIO repr
                reason = f"not a decodable image ({len(bytes(image))} bytes)"
            else:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return f'<span class="noimg">image unavailable: {_esc(reason)}</span>'
        src = f"{_FILES_DIR}/{filename}"
        return (f'<img class="thumb" src="{_esc(src)}" alt="{_esc(alt)}" '
                f'width="{pil.width}" height="{pil.height}">')


def _to_pil(image) -> Image.Image:
    if image is None:
        raise ValueError("no image")
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        pil = Image.open(io.BytesIO(bytes(image)))
        pil.load()
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got {array.dtype}")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2 and not (array.ndim == 3 and array.shape[-1] in (3, 4)):
            raise ValueError(f"expected an (H, W, 3) array, got shape {array.shape}")
        pil = Image.fromarray(array)
    return pil.convert("RGB")   # JPEG has no alpha / palette


# ----------------------------------------------------------------------------- sections

def _table(rows, header=None, cls="") -> str:
    """rows: lists of already-escaped cell html; a cell given as (html, "num") is right-aligned."""
    out = [f'<div class="scroll"><table class="{cls}">' if cls else '<div class="scroll"><table>']
    if header:
        out.append("<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, tuple):
                cells.append(f'<td class="{cell[1]}">{cell[0]}</td>')
            else:
                cells.append(f"<td>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _metrics_table(metrics: dict) -> str:
    if not metrics:
        return '<p class="muted">no metrics</p>'
    # One row of names over one row of values: ~10 metrics stay on one screen line.
    names = [_esc(k) for k in metrics]
    values = [(_fmt_value(v), "num") if _is_number(v) else _fmt_value(v) for v in metrics.values()]
    return _table([values], header=names, cls="metrics")


def _caption_examples(examples, thumbs: _Thumbnails, prefix: str) -> str:
    rows = []
    for ex in examples:
        refs = "".join(f"<li>{_esc(r)}</li>" for r in ex.get("references", []))
        text = (f'<div class="pred">{_esc(ex.get("prediction", ""))}</div>'
                f'<ul class="refs">{refs}</ul>')
        rows.append([thumbs.img_tag(ex.get("image"), prefix, alt=str(ex.get("id", ""))),
                     _esc(ex.get("id", "")), text])
    return _table(rows, header=["image", "id", "prediction / references"], cls="examples")


def _answer_counts(answers) -> str:
    """'yes ×7, no ×3': most frequent first, ties in order of first appearance."""
    counts = collections.Counter(str(a) for a in answers)
    parts = [_esc(a) + (f" ×{n}" if n > 1 else "") for a, n in counts.most_common()]
    return ", ".join(parts)


def _vqa_examples(examples, thumbs: _Thumbnails, prefix: str) -> str:
    out = ['<div class="scroll"><table class="examples">',
           "<tr><th>image</th><th>id</th><th>question</th><th>prediction</th>"
           "<th>answers</th><th>accuracy</th></tr>"]
    for ex in examples:
        score = ex.get("score")
        if _is_number(score) and math.isfinite(score):
            cls = "correct" if score >= 1 else ("partial" if score > 0 else "wrong")
            acc = _fmt_percent(score)
        else:
            cls, acc = "", "n/a"
        img = thumbs.img_tag(ex.get("image"), prefix, str(ex.get("id", "")))
        out.append(
            f'<tr class="{cls}"><td>{img}</td><td>{_esc(ex.get("id", ""))}</td>'
            f'<td>{_esc(ex.get("question", ""))}</td>'
            f'<td class="pred">{_esc(ex.get("prediction", ""))}</td>'
            f'<td>{_answer_counts(ex.get("answers", []))}</td>'
            f'<td class="acc num">{_esc(acc)}</td></tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _score(value) -> str:
    return _esc(_fmt_number(value)) if _is_number(value) else _esc(value)


def _retrieval_examples(examples, thumbs: _Thumbnails, prefix: str) -> str:
    examples = examples or {}
    out = []
    i2t = examples.get("i2t") or []
    if i2t:
        out.append(f"<h3>image → text (top {_TOP_K})</h3>")
        rows = []
        for query in i2t:
            items = []
            for hit in query.get("top", [])[:_TOP_K]:
                mark = "✓ " if hit.get("correct") else ""
                cls = ' class="hit"' if hit.get("correct") else ""
                items.append(f'<li{cls}>{mark}{_esc(hit.get("text", ""))} '
                             f'<span class="muted">({_score(hit.get("score", ""))})</span></li>')
            rows.append([thumbs.img_tag(query.get("image"), prefix, str(query.get("id", ""))),
                         _esc(query.get("id", "")), f'<ol class="top">{"".join(items)}</ol>'])
        out.append(_table(rows, header=["query image", "id", "retrieved texts (score)"],
                          cls="examples"))
    t2i = examples.get("t2i") or []
    if t2i:
        out.append(f"<h3>text → image (top {_TOP_K})</h3>")
        rows = []
        for query in t2i:
            figures = []
            for rank, hit in enumerate(query.get("top", [])[:_TOP_K], 1):
                correct = bool(hit.get("correct"))
                label = f'{rank}. {"✓ " if correct else ""}{_score(hit.get("score", ""))}'
                if hit.get("id") not in (None, ""):
                    label += f'<br><span class="muted">{_esc(hit["id"])}</span>'
                img = thumbs.img_tag(hit.get("image"), prefix, str(hit.get("id", "")))
                cls = ' class="hit"' if correct else ""
                figures.append(f"<figure{cls}>{img}<figcaption>{label}</figcaption></figure>")
            rows.append([f'{_esc(query.get("text", ""))}<br>'
                         f'<span class="muted">{_esc(query.get("id", ""))}</span>',
                         f'<div class="row">{"".join(figures)}</div>'])
        out.append(_table(rows, header=["query text", "retrieved images (rank. score)"],
                          cls="examples"))
    return "\n".join(out)


_RENDERERS = {"caption": _caption_examples, "vqa": _vqa_examples,
              "retrieval": _retrieval_examples}


# ----------------------------------------------------------------------------- report

def write_report(out_dir: str, results: list[dict], *, title: str = "blip2-jax evaluation",
                 metrics_jsonl: str | Mapping[str, str] | None = None, info: dict | None = None,
                 thumbnail: int = 160) -> str:
    """Writes out_dir/report.html, images under out_dir/report_files/; returns the html path."""
    out_dir = os.path.abspath(out_dir)
    files_dir = os.path.join(out_dir, _FILES_DIR)
    os.makedirs(files_dir, exist_ok=True)
    thumbs = _Thumbnails(files_dir, thumbnail)

    anchors = [f"ev{i}-{_safe_name(r.get('name', ''))}" for i, r in enumerate(results)]
    body = [f"<h1>{_esc(title)}</h1>"]
    if info:
        body.append('<div class="scroll"><table class="info">' + "".join(
            f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in info.items())
            + "</table></div>")

    if results:
        body.append("<h2>Summary</h2>")
        rows = []
        for anchor, result in zip(anchors, results):
            key, value = _main_metric(result.get("metrics") or {})
            rows.append([f'<a href="#{anchor}">{_esc(result.get("name", ""))}</a>',
                         _esc(result.get("kind", "")),
                         _esc(key) if key else "—",
                         (_fmt_value(value), "num") if key else "—"])
        body.append(_table(rows, header=["evaluator", "kind", "main metric", "value"]))

    for anchor, result in zip(anchors, results):
        name, kind = result.get("name", ""), result.get("kind", "")
        body.append(f'<h2 id="{anchor}">{_esc(name)} '
                    f'<span class="muted">({_esc(kind)})</span></h2>')
        body.append(_metrics_table(result.get("metrics") or {}))
        examples = result.get("examples")
        if not examples:
            continue
        render = _RENDERERS.get(kind)
        if render is None:     # say so rather than silently dropping the examples of a typo'd kind
            body.append(f'<p class="muted">no example view for kind {_esc(kind)}</p>')
            continue
        body.append(render(examples, thumbs, _safe_name(name)))

    if metrics_jsonl:
        body.append("<h2>Training curves</h2>")
        body.append(_curves_section(metrics_jsonl, out_dir, files_dir))

    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    html_path = os.path.join(out_dir, "report.html")
    tmp_path = html_path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp_path, html_path)   # a reader never sees half a page
    return html_path


def _curves_section(metrics_jsonl, out_dir: str, files_dir: str) -> str:
    paths = list(metrics_jsonl.values()) if isinstance(metrics_jsonl, Mapping) else [metrics_jsonl]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        return f'<p class="muted">metrics file not found: {_esc(", ".join(missing))}</p>'
    try:
        pngs = plot_training_curves(metrics_jsonl, files_dir)
    except (ValueError, ImportError) as e:
        # A truncated metrics.jsonl (run killed mid-write) should not cost the evaluation report.
        return f'<p class="noimg">training curves unavailable: {_esc(e)}</p>'
    if not pngs:
        return '<p class="muted">no plottable metrics</p>'
    imgs = []
    for png in pngs:
        src = os.path.relpath(png, out_dir).replace(os.sep, "/")
        group = os.path.splitext(os.path.basename(png))[0]
        imgs.append(f'<div><img src="{_esc(src)}" alt="{_esc(group)}"></div>')
    return '<div class="curves">' + "\n".join(imgs) + "</div>"


# ----------------------------------------------------------------------------- training curves

_LOSS_KEYS = ("loss", "itc", "itm", "itg", "lm")
_THROUGHPUT_KEYS = ("samples_per_s", "steps_per_s", "tflops_per_device", "mfu")
# What an evaluator logs beside its metrics: the size of its split, not a curve to plot.
_COUNT_KEYS = ("images", "texts", "questions", "num_questions")


def _read_metrics(path: str) -> dict[str, list[tuple[float, float]]]:
    """key -> [(step, value)] sorted by step, finite numbers only.

    metrics.jsonl is opened in append mode, so a resumed run re-logs the steps after its last
    checkpoint: for a repeated step the later row wins (it belongs to the run that continued)."""
    series: dict[str, dict[float, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            step = row.get("step")
            if not _is_number(step) or not math.isfinite(step):
                raise ValueError(f"{path}:{line_no}: missing or non-numeric 'step'")
            for key, value in row.items():
                if key == "step" or not _is_number(value) or not math.isfinite(value):
                    continue    # 'nan'/'inf' strings, NaN literals, text: nothing to draw
                series.setdefault(key, {})[float(step)] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def _groups(keys) -> dict[str, list[str]]:
    """Group name -> keys with data, in a stable order (named keys first, then file order)."""
    keys = list(keys)
    evals = [k for k in keys
             if k.startswith("eval/") and k.rsplit("/", 1)[-1] not in _COUNT_KEYS]
    train = [k for k in keys if not k.startswith("eval/")]
    losses = [k for k in _LOSS_KEYS if k in train]
    losses += [k for k in train if k.endswith("_loss") and k not in losses]
    groups = {"losses": losses,
              "learning_rate": [k for k in ("lr",) if k in train],
              "throughput": [k for k in _THROUGHPUT_KEYS if k in train],
              "eval": evals}
    return {g: ks for g, ks in groups.items() if ks}


def plot_training_curves(metrics_jsonl: str | Mapping[str, str], out_dir: str) -> list[str]:
    """PNG files (absolute paths) written into out_dir: one figure per group that has data —
    'losses' (keys: loss, itc, itm, itg, lm, and any key ending in '_loss'), 'learning_rate'
    (key: lr), 'throughput' (samples_per_s, steps_per_s, tflops_per_device, mfu — subplots as
    needed), 'eval' (every key starting with 'eval/' but the evaluators' split sizes:
    eval/NAME/images, texts, questions, num_questions). x axis = 'step'. Rows are JSON objects
    one per line; values may be numbers or strings like 'nan'/'inf' (skip non-numeric); a key
    missing from some rows is fine; malformed lines raise ValueError naming the file and line.
    Several runs ({label: metrics.jsonl}) share the figures: each key one line per run, labelled
    by run, so two arms of an experiment are compared in one plot."""
    paths = metrics_jsonl if isinstance(metrics_jsonl, Mapping) else {"": metrics_jsonl}
    # parse first: a bad file fails before any import
    runs = {label: _read_metrics(path) for label, path in paths.items()}
    series = {k: None for r in runs.values() for k in r}       # every key, in file order
    groups = _groups(series)
    if not groups:
        return []
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    # start-up time: matplotlib is imported only when a report plots curves
    from matplotlib.figure import Figure
    # start-up time: matplotlib is imported only when a report plots curves
    from matplotlib.ticker import MaxNLocator

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for group, keys in groups.items():
        # One axes for quantities of one unit (losses, lr); one per key otherwise (samples/s and
        # MFU, or CIDEr and accuracy, do not share a y scale).
        panels = [keys] if group in ("losses", "learning_rate") else [[k] for k in keys]
        ncols = 1 if group != "eval" else min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(8 if ncols == 1 else 4 * ncols, 3.2 * nrows + 0.6), dpi=100,
                     layout="constrained")
        FigureCanvasAgg(fig)
        fig.suptitle(group.replace("_", " "))
        for i, panel in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            lines = [(key, label, run[key]) for key in panel
                     for label, run in runs.items() if key in run]
            for key, label, points in lines:
                steps, values = zip(*points)
                # eval rows are sparse: markers keep a 2-point curve readable.
                marker = "o" if group == "eval" or len(steps) < 20 else None
                name = key if len(runs) == 1 else label if len(panel) == 1 else f"{label}: {key}"
                ax.plot(steps, values, label=name, marker=marker, markersize=3, linewidth=1.2)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # no "step 1.5" ticks
            if len(lines) > 1:
                ax.legend(fontsize="small")
            if len(panel) == 1:
                ax.set_title(panel[0], fontsize="medium")
            ax.grid(True, alpha=0.3)
        path = os.path.join(out_dir, f"{group}.png")
        fig.savefig(path, format="png")
        paths.append(path)
    return paths
