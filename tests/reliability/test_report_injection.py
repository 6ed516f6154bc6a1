"""Reports with hostile strings everywhere a user string can reach (prompts, captions, checkpoint
labels and paths, notes, cluster class names, the run folder's own name): everything is escaped,
template syntax is not evaluated, and nothing remote is referenced. The basic <script>/onerror case
is tests/test_report_html.py::test_report_sections_escaping_and_no_remote; this adds template
injection, attribute breaking and URL schemes, and the compare page."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from _report_helpers import make_fake_run

from harness.cli import main
from harness.eval import layout

PAYLOADS = [
    "{{ 7*7 }}",
    "{% for x in range(3) %}LOOP{% endfor %}",
    "{{ config.__class__.__init__.__globals__ }}",
    '"><img src=x onerror=alert(1)>',
    "'><svg/onload=alert(2)>",
    "javascript:alert(3)",
    "</textarea></script><script>alert(4)</script>",
    "https://evil.example/x.png",
    "<link rel=stylesheet href=//evil.example/s.css>",
]


class _Attrs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]


def _inject(run):
    """Put every payload into per-image prompts, checkpoint labels/sources, notes and breakdowns."""
    per = [json.loads(x) for x in (run / layout.PER_IMAGE).read_text().splitlines()]
    for i, r in enumerate(per):
        r["prompt"] = PAYLOADS[i % len(PAYLOADS)] + " " + r["prompt"]
    (run / layout.PER_IMAGE).write_text("".join(json.dumps(r) + "\n" for r in per))
    for name in (layout.RESULTS, layout.RUN):
        d = json.loads((run / name).read_text())
        for c in d["checkpoints"]:
            c["source"] = "/models/" + " ".join(PAYLOADS)
        if name == layout.RESULTS:
            d["notes"] += PAYLOADS
            d["breakdowns"]["cluster_kl"]["cand"] += [{"class": p, "kl": 0.1, "n_base": 1, "n_candidate": 1}
                                                       for p in PAYLOADS]
            d["grids"][0]["caption"] = " ".join(PAYLOADS)
            d["xray"][0]["prompt"] = " ".join(PAYLOADS)
        else:
            d["data"] = " ".join(PAYLOADS)
        (run / name).write_text(json.dumps(d))


def _check(html: str):
    p = _Attrs()
    p.feed(html)
    # template syntax in data is shown as text, never evaluated
    assert "{{ 7*7 }}" in html and "{% for x in range(3) %}LOOP{% endfor %}" in html and "LOOPLOOP" not in html
    assert "{{ config.__class__.__init__.__globals__ }}" in html
    assert p.tags.count("script") == 1 and "svg" not in p.tags and "link" not in p.tags
    for tag, k, v in p.attrs:
        assert not k.startswith("on"), (tag, k, v)
        if k in ("src", "href", "action", "poster", "data", "srcset", "formaction"):
            assert v.startswith(("data:image/", "#")), (tag, k, v[:80])
    low = html.lower()
    assert 'href="https://' not in low and 'src="https://' not in low and "url(http" not in low
    assert "@import" not in low


def test_report_escapes_every_hostile_string(tmp_path, capsys):
    run = make_fake_run(tmp_path)
    _inject(run)
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    _check(html)
    assert "&lt;/textarea&gt;&lt;/script&gt;&lt;script&gt;alert(4)" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html or "&quot;&gt;&lt;img" in html


def test_compare_page_escapes_hostile_labels_and_paths(tmp_path, capsys):
    runs = []
    for k in range(2):
        run = make_fake_run(tmp_path / f"r{k}")
        _inject(run)
        d = json.loads((run / layout.RESULTS).read_text())
        for r in d["rows"]:
            r["checkpoint"] = PAYLOADS[k]
        (run / layout.RESULTS).write_text(json.dumps(d))
        runs.append(str(run))
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    html = (tmp_path / "cmp" / "compare.html").read_text()
    p = _Attrs()
    p.feed(html)
    assert "LOOPLOOP" not in html and "<img src=x" not in html and "svg" not in p.tags
    assert all(not k.startswith("on") for _, k, _v in p.attrs)
    assert all(v.startswith(("data:image/", "#")) for _, k, v in p.attrs if k in ("src", "href"))
