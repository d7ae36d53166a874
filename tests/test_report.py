"""HTML evaluation report (`blip2_jax.eval.report`): offline images, escaping, marks, curves."""
import io
import json
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from blip2_jax.eval.report import plot_training_curves, write_report

_VOID = {"img", "br", "meta", "hr", "input", "link", "col", "wbr"}


class _Node:
    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    @property
    def classes(self):
        return (self.attrs.get("class") or "").split()

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag, cls=None):
        found = []
        for c in self.children:
            if isinstance(c, _Node):
                if c.tag == tag and (cls is None or cls in c.classes):
                    found.append(c)
                found += c.find_all(tag, cls)
        return found


class _TreeParser(HTMLParser):
    """Minimal DOM: enough to check structure, and strict about unbalanced tags."""

    def __init__(self):
        super().__init__()
        self.root = _Node("#root", [])
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(_Node(tag, attrs))

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def _parse(html_text):
    parser = _TreeParser()
    parser.feed(html_text)
    parser.close()
    assert parser.stack == [parser.root], "unclosed tags"
    return parser.root


def _png_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _array(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _results():
    caption = {
        "name": "caption_test", "kind": "caption",
        "metrics": {"Bleu_4": 0.30123456, "CIDEr": 1.2, "SPICE_unavailable": "java not found",
                    "num_images": 2},
        "examples": [
            {"id": "img1", "image": _array(200, 320, 0), "prediction": "a cat <b>& a dog",
             "references": ["a cat", "two animals"]},
            {"id": "img2", "image": b"not an image", "prediction": "a bad image",
             "references": ["nothing"]},
        ]}
    vqa = {
        "name": "vqa val", "kind": "vqa",
        "metrics": {"num_questions": 3, "accuracy": 66.67},
        "examples": [
            {"id": "q1", "image": _png_bytes("red"), "question": "is it red?", "prediction": "yes",
             "answers": ["yes"] * 7 + ["no"] * 3, "score": 1.0},
            {"id": "q2", "image": _array(32, 32, 1), "question": "how many?", "prediction": "2",
             "answers": ["3"] * 8 + ["2"] * 2, "score": 0.6},
            {"id": "q3", "image": _array(32, 32, 2), "question": "what color?",
             "prediction": "blue", "answers": ["green"] * 10, "score": 0.0},
        ]}
    texts = [f"caption number {i}" for i in range(6)]
    retrieval = {
        "name": "retrieval/coco", "kind": "retrieval",
        "metrics": {"txt_r1": 50.0, "r_mean": 61.5, "agg_metrics": 70.25},
        "examples": {
            "i2t": [{"id": "im0", "image": _png_bytes("blue"),
                     "top": [{"text": t, "score": 1.0 - 0.1 * i, "correct": i in (1, 3)}
                             for i, t in enumerate(texts)]}],
            "t2i": [{"id": "t0", "text": "a query text",
                     "top": [{"image": _array(24, 36, 10 + i), "id": f"cand{i}",
                              "score": 0.9 - 0.1 * i, "correct": i == 2} for i in range(6)]}],
        }}
    return [caption, vqa, retrieval]


def _write_metrics(path):
    rows = [
        {"step": 1, "loss": 5.0, "itc": 2.0, "itm": 0.7, "lm": 2.3, "lr": 1e-6,
         "samples_per_s": 100.0, "mfu": 0.3},
        {"step": 2, "loss": "nan", "itc": 1.8, "itm": 0.6, "lm": 2.1, "lr": 2e-6,
         "samples_per_s": 120.0},
        {"step": 3, "loss": 4.0, "itc": 1.5, "lr": 3e-6, "samples_per_s": "inf", "mfu": 0.35},
        {"step": 3, "eval/CIDEr": 0.5, "eval/val_loss": 3.0},
        {"step": 4, "loss": 3.5, "itc": 1.2, "itm": 0.5, "lm": 1.8, "lr": 4e-6,
         "samples_per_s": 130.0, "mfu": 0.4},
        {"step": 6, "eval/CIDEr": 0.7, "eval/val_loss": 2.5},
    ]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write("\n")   # a trailing blank line is not an error


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("report"))
    metrics = os.path.join(out_dir, "metrics.jsonl")
    _write_metrics(metrics)
    path = write_report(out_dir, _results(), title="run <1>", metrics_jsonl=metrics,
                        info={"checkpoint": "/ckpt/step_100", "step": 100}, thumbnail=160)
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    return out_dir, path, raw, _parse(raw)


def test_report_images_are_local_files(report):
    out_dir, path, raw, root = report
    assert path == os.path.join(out_dir, "report.html")
    imgs = root.find_all("img")
    # 1 caption (the other fails) + 3 vqa + 1 i2t query + 5 t2i (top-5 of 6) + 4 curve figures
    assert len(imgs) == 14
    srcs = [img.attrs["src"] for img in imgs]
    assert len(set(srcs)) == len(srcs)
    for src in srcs:
        assert "://" not in src and not src.startswith(("/", "data:")), src
        file = os.path.join(out_dir, *src.split("/"))
        assert os.path.isfile(file), src
        with Image.open(file) as im:
            im.verify()
    # thumbnails: longest side 160, aspect kept; small images are not enlarged
    first = os.path.join(out_dir, *srcs[0].split("/"))
    with Image.open(first) as im:
        assert im.format == "JPEG" and im.size == (160, 100)
    assert "<script" not in raw.lower() and "http" not in raw


def test_report_escapes_data(report):
    _, _, raw, root = report
    assert "&lt;b&gt;&amp;" in raw
    assert "<b>&" not in raw
    assert "run &lt;1&gt;" in raw
    preds = [n.text() for n in root.find_all("div", "pred")]
    assert "a cat <b>& a dog" in preds      # decoded text round-trips


def test_report_bad_image_placeholder(report):
    _, _, _, root = report
    placeholders = [n.text() for n in root.find_all("span", "noimg")]
    assert len(placeholders) == 1
    assert placeholders == ["image unavailable: not a decodable image (12 bytes)"]


def test_report_metrics_and_summary(report):
    _, _, raw, root = report
    text = root.text()
    for name in ("caption_test", "vqa val", "retrieval/coco"):
        assert name in text
    for value in ("0.3012", "1.2", "java not found", "66.67", "61.5", "70.25", "50"):
        assert value in text, value
    info = root.find_all("table", "info")[0]
    assert [(tr.find_all("th")[0].text(), tr.find_all("td")[0].text())
            for tr in info.find_all("tr")] == [("checkpoint", "/ckpt/step_100"), ("step", "100")]
    summary = root.find_all("table")[1]      # after the info table
    rows = [[td.text() for td in tr.find_all("td")] for tr in summary.find_all("tr")[1:]]
    assert rows == [["caption_test", "caption", "CIDEr", "1.2"],
                    ["vqa val", "vqa", "accuracy", "66.67"],
                    ["retrieval/coco", "retrieval", "agg_metrics", "70.25"]]
    # summary links resolve to the evaluators' sections
    ids = {n.attrs.get("id") for n in root.find_all("h2")}
    assert all(a.attrs["href"][1:] in ids for a in summary.find_all("a"))


def test_report_vqa_rows(report):
    _, _, _, root = report
    rows = {tr.classes[0]: tr.text() for tr in root.find_all("tr")
            if tr.classes and tr.classes[0] in ("correct", "partial", "wrong")}
    assert set(rows) == {"correct", "partial", "wrong"}
    assert "yes ×7, no ×3" in rows["correct"] and "100%" in rows["correct"]
    assert "3 ×8, 2 ×2" in rows["partial"] and "60%" in rows["partial"]
    assert "green ×10" in rows["wrong"] and "0%" in rows["wrong"]


def test_report_retrieval_marks(report):
    _, _, raw, root = report
    hits = [li.text() for li in root.find_all("li", "hit")]
    assert len(hits) == 2
    assert hits[0].startswith("✓ caption number 1") and hits[1].startswith("✓ caption number 3")
    ranked = [li.text() for ol in root.find_all("ol", "top") for li in ol.find_all("li")]
    assert [t.split(" (")[0].lstrip("✓ ") for t in ranked] == [f"caption number {i}"
                                                               for i in range(5)]
    assert "caption number 5" not in raw          # only the top 5 are shown
    figures = root.find_all("figure")
    assert len(figures) == 5
    marked = [f for f in figures if "hit" in f.classes]
    assert len(marked) == 1 and "cand2" in marked[0].text() and "✓" in marked[0].text()
    assert all("✓" not in f.text() for f in figures if f not in marked)


def test_report_training_curves(report):
    out_dir, _, _, root = report
    files = os.path.join(out_dir, "report_files")
    for group in ("losses", "learning_rate", "throughput", "eval"):
        png = os.path.join(files, f"{group}.png")
        assert os.path.getsize(png) > 5000, group
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200
    curves = [img.attrs["src"] for div in root.find_all("div", "curves")
              for img in div.find_all("img")]
    assert curves == [f"report_files/{g}.png"
                      for g in ("losses", "learning_rate", "throughput", "eval")]


def test_plot_training_curves_groups_and_skips(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "lr": "nan", "note": "hello"}\n'
                    '{"step": 2, "lr": "inf", "my_loss": 1.0}\n')
    pngs = plot_training_curves(str(path), str(tmp_path / "out"))
    assert pngs == [str(tmp_path / "out" / "losses.png")]      # lr never had a number
    assert os.path.isabs(pngs[0]) and os.path.isfile(pngs[0])


def test_runs_compared_in_one_plot(tmp_path, monkeypatch):
    """{label: metrics.jsonl}: each key drawn once per run that logged it, labelled by run, in
    the same figures (the demo's ablation: both arms of stage 2 side by side)."""
    from matplotlib.axes import Axes
    drawn = []
    plot = Axes.plot

    def record(self, x, y, *a, **k):
        drawn.append((k["label"], tuple(x), tuple(y)))
        return plot(self, x, y, *a, **k)
    monkeypatch.setattr(Axes, "plot", record)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"step": 1, "lm": 2.0, "itg": 3.0}\n'
                 '{"step": 2, "lm": 1.5, "eval/vqa_test/overall": 40}\n')
    b.write_text('{"step": 1, "lm": 2.5}\n{"step": 2, "lm": 2.0, "eval/vqa_test/overall": 30,'
                 ' "eval/vqa_test/questions": 300}\n')
    pngs = plot_training_curves({"stage 1": str(a), "fresh": str(b)}, str(tmp_path / "out"))
    assert [os.path.basename(p) for p in pngs] == ["losses.png", "eval.png"]
    assert drawn == [("stage 1: itg", (1.0,), (3.0,)),        # several keys: run and key
                     ("stage 1: lm", (1.0, 2.0), (2.0, 1.5)), ("fresh: lm", (1.0, 2.0), (2.5, 2.0)),
                     ("stage 1", (2.0,), (40.0,)), ("fresh", (2.0,), (30.0,))]    # one: run


def test_eval_curves_plot_metrics_not_split_sizes():
    """An in-training evaluation logs its split's size beside its metrics (train/loop.py): the
    eval figure plots the metrics only."""
    from blip2_jax.eval import report as report_lib
    keys = ["loss", "eval/caption_test/CIDEr", "eval/caption_test/images",
            "eval/vqa_test/overall", "eval/vqa_test/questions", "eval/vqa_test/num_questions",
            "eval/retrieval_test/txt_r1",
            "eval/retrieval_test/texts", "eval/retrieval_test/images"]
    assert report_lib._groups(keys)["eval"] == ["eval/caption_test/CIDEr", "eval/vqa_test/overall",
                                                "eval/retrieval_test/txt_r1"]


@pytest.mark.parametrize("bad", ['{"step": 2, "loss": 1.0', "[1, 2]", '{"loss": 1.0}'])
def test_plot_training_curves_malformed(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3\b"):
        plot_training_curves(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()       # nothing written for a bad file


def test_report_survives_bad_metrics_and_unknown_kind(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n')
    results = [{"name": "x y", "kind": "mystery", "metrics": {"score": "n/a"},
                "examples": [{"id": "a"}]},
               {"name": "x_y", "kind": "caption", "metrics": {},
                "examples": [{"id": "b", "image": _array(8, 8, 3), "prediction": "p",
                              "references": []}]}]
    path = write_report(str(tmp_path), results, metrics_jsonl=str(metrics))
    raw = open(path, encoding="utf-8").read()
    root = _parse(raw)
    assert "training curves unavailable" in raw and "metrics.jsonl:2" in raw
    assert "no example view for kind mystery" in raw
    summary = root.find_all("table")[0]
    assert [td.text() for td in summary.find_all("tr")[1].find_all("td")][2:] == ["—", "—"]
    assert len(root.find_all("img")) == 1
