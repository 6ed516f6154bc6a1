"""A fabricated eval run folder (no models), so the report can be tested in isolation, plus the
HTML checks every report test shares: it parses, has every section, escapes, fetches nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from harness.eval import layout
from harness.io import append_jsonl, atomic_write_json

HOSTILE = '<script>alert(1)</script>'
HOSTILE_CAPTION = '"><img src=x onerror=alert(2)> & <b>bold</b>'
DATA_DIR = "data <i>&'\""  # a dataset folder whose name needs escaping


def _png(path: Path, seed: int, size: int = 32) -> str:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def make_fake_run(root: Path, *, hostile_dir: bool = True) -> Path:
    """A complete run folder as ``harness eval`` writes it, with hostile strings in prompts,
    captions, labels and paths."""
    run = root / ("run <b>&'\"" if hostile_dir else "run")
    run.mkdir(parents=True)
    ckpts = [{"label": "base", "role": "base", "source": f"/models/{HOSTILE}", "sha256": "ab" * 32},
             {"label": "cand", "role": "candidate", "source": "/models/cand", "sha256": "cd" * 32}]
    suite_cfg = {"name": "fake", "prompts": {"generic": {"kind": "generic"}, "domain": {"kind": "in_domain"}},
                 "ci": {"alpha": 0.05}}
    atomic_write_json(run / layout.RUN, {
        "schema": layout.RUN_SCHEMA, "suite": {"name": "fake", "version": "1", "hash": "0123", "path": "x.yaml"},
        "suite_config": suite_cfg, "checkpoints": ckpts, "seeds": [0, 1], "generation": {"steps": 2},
        "data": str(root / DATA_DIR), "provenance": {},
    })
    prompts = {"generic": ["a red apple", HOSTILE], "domain": [HOSTILE_CAPTION, "a cat"]}
    # the reference lives in the run's dataset (the report embeds no image from anywhere else)
    ref = _png(root / DATA_DIR / f"{HOSTILE_CAPTION.replace('/', '_')}.png", 99)
    k = 0
    for subset, ps in prompts.items():
        for i, p in enumerate(ps):
            for seed in (0, 1):
                for c in ckpts:
                    img = run / "images" / c["label"] / subset / f"{i:05d}-{seed}.png"
                    _png(img, k)
                    heat = None
                    if c["label"] == "cand":
                        heat = run / "heatmaps" / "cand" / f"{subset}-{i}-{seed}.png"
                        _png(heat, k + 1000, size=16)
                    k += 1
                    append_jsonl(run / layout.PER_IMAGE, {
                        "checkpoint": c["label"], "subset": subset, "index": i, "seed": seed, "prompt": p,
                        "image": layout.rel(run, img), "reference": ref if subset == "domain" else None,
                        "clip_score": 20.0 + k % 7, "artifact_score": (k % 5) / 2,
                        "heatmap": layout.rel(run, heat) if heat else None, "nonfinite": k == 3,
                    })
    rows = []
    for metric, hib in (("clip_score", True), ("artifact_score", False), ("fid_clip", False)):
        for subset in prompts:
            for c in ckpts:
                v = 25.0 if c["role"] == "base" else 27.0
                row = {"checkpoint": c["label"], "role": c["role"], "step": None, "metric": metric,
                       "metric_name": "fid" if metric == "fid_clip" else metric, "subset": subset, "value": v,
                       "ci_low": v - 1, "ci_high": v + 1, "n": 4, "higher_is_better": hib,
                       "diff": None, "diff_ci_low": None, "diff_ci_high": None, "verdict": None,
                       "note": "only 4 images: FID is unreliable, see KID" if metric == "fid_clip" else None}
                if c["role"] == "candidate":
                    row.update(diff=2.0, diff_ci_low=0.5, diff_ci_high=3.5, verdict="better" if hib else "worse")
                rows.append(row)
    grid = _png(run / "grids" / "cand" / "g" / "page-0.png", 5, size=96)
    strip = _png(run / "xray" / "cand" / "0" / "strip.png", 6, size=48)
    results = {
        "schema": layout.RESULTS_SCHEMA, "suite": {"name": "fake", "version": "1", "hash": "0123"},
        "checkpoints": ckpts, "rows": rows,
        "breakdowns": {"cluster_kl": {"cand": [{"class": HOSTILE, "kl": 0.2, "n_base": 3, "n_candidate": 5}]}},
        "surfaces": [{"grid": "cfg-steps", "x_axis": "cfg", "y_axis": "steps", "x_values": [1, 4],
                      "y_values": [2, 4], "clip_score": {"base": [[20, 21], [22, 23]], "cand": [[21, 25], [20, 22]]},
                      "artifact_score": {"base": [[1, 2], [1, 0.5]], "cand": [[0.3, 2], [1, 1]]}}],
        "grids": [{"name": "cfg-steps", "checkpoint": "cand", "pages": [layout.rel(run, grid)],
                   "caption": f"prompt: {HOSTILE}"}],
        "xray": [{"checkpoint": "cand", "prompt": HOSTILE, "seed": 0, "strip": layout.rel(run, strip),
                  "stats": {"latent std": [1.0, 0.8, 0.6], "latent mean": [0.0, 0.1, 0.05]}}],
        "gates": [{"gate": "clip_score", "rule": "min", "threshold": 28.0, "checkpoint": "cand",
                   "subset": "generic", "value": 27.0, "passed": False}],
        "gates_passed": False, "notes": [f"reference folder /r/{HOSTILE} has 4 images"],
        "provenance": {"command": f"harness eval s.yaml --base '{HOSTILE}'", "versions": {"torch": "x"},
                       "hardware": {"cpu_count": 2}},
    }
    atomic_write_json(run / layout.RESULTS, results)
    return run


def write_training_run(root: Path) -> Path:
    d = root / "train"
    for s in range(0, 50, 5):
        append_jsonl(d / "metrics.jsonl", {"step": s, "loss": 1 / (s + 1), "lr": 1e-4})
        if s % 10 == 0:
            append_jsonl(d / "metrics.jsonl", {"step": s, "val_loss": 1.2 / (s + 1), "eval/clip_score": 20 + s / 10})
    return d


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.tags, self.urls, self.script_text = set(), [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("src", "href", "action", "data", "poster"):
            if a.get(k):
                self.urls.append(a[k])
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text.append(data)


def check_report_html(html: str, sections) -> _Collector:
    """Parse ``html`` and assert what every report must satisfy; returns the parse for more checks."""
    p = _Collector()
    p.feed(html)
    p.close()
    missing = [s for s, _ in sections if s not in p.ids]
    assert not missing, f"sections missing: {missing}"
    assert p.tags.count("script") == 1, "only the one sorting script may exist (a prompt injected another)"
    assert "alert(" not in "".join(p.script_text)
    assert "<script>alert(1)</script>" not in html
    assert "<img src=x" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for u in p.urls:
        assert u.startswith(("data:", "#")), f"non-local resource referenced: {u[:80]}"
    low = html.lower()
    assert "http://" not in low and "https://" not in low and "//cdn" not in low
    return p


def chromium_screenshot(html_path: Path, png: Path) -> np.ndarray:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    assert os.path.exists(exe), "chromium not installed (Debian package 'chromium'; .ci/run installs it)"
    with tempfile.TemporaryDirectory() as prof:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={prof}", f"--screenshot={png}", "--window-size=1200,900",
               Path(html_path).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("L"), dtype=np.float64)


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --- eval runs on the tiny zoo -----------------------------------------------------------------

HOSTILE_DIR = 'data <b>&"\''


def make_dataset(root: Path, n: int = 8) -> Path:
    """Coloured squares with captions (one hostile), every other image in the held-out split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a = np.zeros((64, 64, 3), np.uint8)
        a[...] = rng.integers(0, 255, 3)
        a[16:48, 16:48] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(root / f"img{i:02d}.png")
        cap = HOSTILE + " " + HOSTILE_CAPTION if i == 0 else f"a square of colour {i}"
        rows.append({"file_name": f"img{i:02d}.png", "text": cap, "split": "val" if i % 2 == 0 else "train"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def perturbed_copy(src: Path, dst: Path, scale: float = 0.05, seed: int = 1) -> Path:
    """The tiny SD with noise added to its UNet: a 'fine-tune' whose images really differ."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    pipe.save_pretrained(str(dst))
    return dst


def strip_provenance(results: dict) -> dict:
    """results.json without what legitimately differs between runs (the command line, host, time)."""
    return {k: v for k, v in results.items() if k != "provenance"}


def untrained_estimator(zoo: Path, out: Path) -> Path:
    """An artifact estimator with a real config (the zoo's CLIP and VAE) and random weights: it exercises
    the artifact-score plumbing, not its accuracy."""
    import torch

    from harness.estimator.dataset import load_vae, vae_identity
    from harness.estimator.model import EstimatorConfig, build_net, load_clip, save_estimator

    clip, clip_cfg, size, mean, std = load_clip(f"local-dir:{zoo / 'clip'}")
    cfg = EstimatorConfig(clip=f"local-dir:{zoo / 'clip'}", clip_model_cfg=clip_cfg, clip_image_size=size,
                          clip_mean=tuple(mean), clip_std=tuple(std), hidden=32, preview="linear", preview_size=16,
                          image_size=64, timesteps=(0,), vae=vae_identity(load_vae(zoo / "sd"), zoo / "sd"))
    torch.manual_seed(0)
    save_estimator(build_net(cfg, clip).eval(), out)
    return out
