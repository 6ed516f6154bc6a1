"""``harness demo``: the whole loop on a CPU, on models that were really trained.

caption -> fine-tune -> eval -> report, on the digits world (:mod:`harness.world.digits`): held-out
digits restyled in red ink on cream paper (a style the base model has never drawn) are captioned by
the world's BLIP with the suffix ", red ink", the base pipeline's UNet is fine-tuned on them with
``recipes/demo-digits.yaml`` through the project's trainer, and ``eval/demo-digits.yaml`` compares
base and fine-tune (FID/KID/CMMD on the world's CLIP features against unseen restyled digits, CLIP
score, artifact score, detector-cluster KL, CFG x steps grids) in one HTML report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.io import atomic_write_json
from harness.world import digits as D
from harness.world import digits_data as DD

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo-digits.yaml"
SUITE = REPO / "eval" / "demo-digits.yaml"
SUFFIX = ", red ink"
VAL_FRACTION = 1 / 3  # of the held-out digits: the eval's references and prompts; the rest is fine-tuned on


@dataclass
class DemoResult:
    out: Path
    world: Path
    finetune: Path
    report: Path | None
    summary: str
    results: dict | None = None
    captions: dict = field(default_factory=dict)
    shift: dict = field(default_factory=dict)  # detector-cluster KL base->fine-tune vs base->base


def write_demo_data(root: str | Path, seed: int = 0, style: tuple[str, str] = DD.DEMO_STYLE) -> Path:
    """The held-out digits (never seen by the base model) restyled, as ROOT/train and ROOT/val PNGs.

    Returns ``root``. Images only: captions come from the captioner, as they would for a user."""
    from PIL import Image

    root = Path(root)
    ink, y = DD.load_ink()
    _, held = DD.split_indices(len(y), seed)
    images = DD.to_uint8(DD.render_style(ink[held], style))
    n_val = int(round(len(held) * VAL_FRACTION))
    for i, (img, label) in enumerate(zip(images, y[held])):
        split = "val" if i < n_val else "train"
        path = root / split / f"{i:04d}_{DD.DIGIT_WORDS[label]}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
    return root


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise HarnessError(f"{path}: the demo's {what} is missing (it ships in the repository's {path.parent.name}/)")
    return path


def run_demo(out: str | Path, *, cfg: D.WorldConfig | None = None, world_dir: str | Path | None = None,
             recipe_overrides: list[str] | tuple[str, ...] = (), eval_overrides: list[str] | tuple[str, ...] = (),
             progress: bool = True, rebuild: bool = False) -> DemoResult:
    """Run the demo into ``out`` (resumable: every step reuses what a previous run finished);
    ``rebuild`` builds the world from scratch instead of installing the shipped one."""
    from harness.caption.blip import caption_folder
    from harness.report.evaluate import run_eval
    from harness.train.loop import train_from_file

    cfg = cfg or D.WorldConfig()
    out = Path(out)
    recipe, suite = _require(RECIPE, "recipe"), _require(SUITE, "eval suite")
    log.info("demo 1/5: the digits world (shipped for the default settings; else built once and cached)")
    world = D.digits_world(cfg, world_dir, rebuild=rebuild)
    log.info("demo 2/5: restyled held-out digits (%s ink on %s paper) -> %s", *DD.DEMO_STYLE, out / "data")
    data = write_demo_data(out / "data", cfg.seed)
    log.info("demo 3/5: captioning them with the world's BLIP, suffix %r", SUFFIX)
    summary = caption_folder(data, model=str(world / "blip"), suffix=SUFFIX, num_beams=1, max_new_tokens=24,
                             progress=progress)
    log.info("demo 3/5: %s; %s", summary.format().splitlines()[0], caption_accuracy(summary))
    log.info("demo 4/5: fine-tuning the base with %s", recipe)
    run_dir = out / "finetune"
    final = run_dir / "final"
    if not (final / "model_index.json").exists():
        final = train_from_file(recipe, [f"model.source={world / 'sd'}", f"data.root={data}",
                                         f"output_dir={run_dir}", *recipe_overrides],
                                resume="latest" if run_dir.exists() else None)
    log.info("demo 5/5: evaluating base vs fine-tune with %s", suite)
    models = [f"models.clip={world / 'clip'}", f"models.detector={world / 'yolo'}"]
    if (world / "estimator").exists():
        models.append(f"models.estimator={world / 'estimator'}")
    res = run_eval(suite, base=str(world / "sd"), candidates=[str(final)], out=out / "eval", data=data,
                   overrides=[*models, *eval_overrides], progress=progress, report=False)
    shift = distribution_shift(out / "eval", world)
    checks = artifact_checks(out / "eval", world)
    text = " ".join(x for x in (verdict_summary(res.results or {}), shift_sentence(shift), checks["sentence"]) if x)
    report = _report(out / "eval", run_dir, checks["sentence"])
    atomic_write_json(out / "demo.json", {"world": str(world), "finetune": str(final), "report": str(report),
                                          "summary": text, "captioned": getattr(summary, "captioned", None),
                                          "caption_counts": summary.counts(), "caption_check": caption_accuracy(summary),
                                          "shift": shift, "artifact_checks": checks})
    return DemoResult(out, world, Path(final), report, text, res.results, shift=shift)


def caption_accuracy(summary) -> str:
    """How often the world's BLIP named the digit the file holds (the demo's files end in its word)."""
    pairs = [(Path(p).stem.rsplit("_", 1)[-1], text) for p, text in summary.captioned]
    pairs = [(w, t) for w, t in pairs if w in DD.DIGIT_WORDS]
    if not pairs:
        return "no caption to check"
    right = sum(f" {w} " in f" {t.replace(',', ' ')} " for w, t in pairs)
    return f"the digit is right in {right}/{len(pairs)} captions"


def artifact_checks(eval_dir: Path, world: Path, subset: str = "in_domain") -> dict:
    """The estimator's style gap on clean digits and a colour-blind judge of the generated digits."""
    from harness.eval import layout
    from harness.io import read_jsonl
    from harness.world.judge import artifact_sentence, independent_judge, style_check

    style = style_check(world) if (world / "estimator").exists() else {}
    recs = [r for r in read_jsonl(eval_dir / layout.PER_IMAGE) if r["subset"] == subset]
    judge = independent_judge(eval_dir, recs)
    return {"subset": subset, "style": style, "judge": judge, "sentence": artifact_sentence(style, judge)}


def _report(eval_dir: Path, train_run: Path, note: str) -> Path:
    """The eval report, with the artifact checks as a note at its top."""
    from harness.eval import layout
    from harness.report.html import write_report

    if note:
        results = json.loads((eval_dir / layout.RESULTS).read_text())
        if note not in results.get("notes", []):
            results.setdefault("notes", []).append(note)
            atomic_write_json(eval_dir / layout.RESULTS, results)
    return write_report(eval_dir, train_run=train_run)


def distribution_shift(eval_dir: Path, world: Path, subset: str = "in_domain", seed: int = 0) -> dict:
    """How far the fine-tune moved the base's output distribution, against sampling noise: the
    detector-cluster KL between half the base's samples and half the fine-tune's, and between the two
    halves of the base's own samples (what the KL reads when nothing changed)."""
    from PIL import Image

    from harness.eval import layout
    from harness.io import read_jsonl
    from harness.metrics.cluster_kl import ClusterKL
    from harness.metrics.detector import YoloDetector

    recs = [r for r in read_jsonl(eval_dir / layout.PER_IMAGE) if r["subset"] == subset and r.get("image")]
    load = lambda r: np.asarray(Image.open(eval_dir / r["image"]).convert("RGB"))  # noqa: E731
    base = [load(r) for r in recs if r["checkpoint"] == "base"]
    cand = [load(r) for r in recs if r["checkpoint"] != "base"]
    half = min(len(base), len(cand)) // 2
    if half < 2:
        return {}
    detector = YoloDetector(str(world / "yolo"), imgsz=DD.YOLO_SIZE)

    def kl(a, b) -> float | None:
        m = ClusterKL(detector, embedder=f"clip:{world / 'clip'}", seed=seed)
        m.update(a, set="bm")
        m.update(b, set="tm")
        value = m.compute()["kl_bm_tm"]  # None when the detector found too little to cluster
        return None if value is None else float(value)

    # Disjoint halves on both sides, so neither KL compares an image with itself.
    return {"subset": subset, "n_per_side": half, "kl_base_finetune": kl(base[:half], cand[half:2 * half]),
            "kl_base_base": kl(base[:half], base[half:2 * half])}


def shift_sentence(shift: dict) -> str:
    if not shift:
        return ""
    across, within = shift["kl_base_finetune"], shift["kl_base_base"]
    if across is None or within is None:
        return (f"Detector-cluster KL base -> fine-tune: not computed (the detector found too few digits in "
                f"{shift['n_per_side']} images a side).")
    times = f"{across / within:.1f}x" if within > 0 else "far above"
    return (f"Detector-cluster KL base -> fine-tune {across:.3g} vs {within:.3g} between two halves of the base's "
            f"own samples ({times} the sampling noise, {shift['n_per_side']} images a side).")


def _rows(results: dict) -> dict[tuple[str, str], dict[str, dict]]:
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results.get("rows", []):
        table.setdefault((r["metric"], r["subset"]), {})[r.get("role", "?")] = r
    return table


def verdict_summary(results: dict) -> str:
    """One paragraph: each headline metric, base -> fine-tune, and its verdict."""
    parts, better, worse = [], 0, 0
    for (metric, subset), cells in _rows(results).items():
        base, cand = cells.get("base"), cells.get("candidate")
        if not base or not cand or not _finite(base.get("value")) or not _finite(cand.get("value")):
            continue
        v = cand.get("verdict") or "inconclusive"
        better += v == "better"
        worse += v == "worse"
        parts.append(f"{metric} ({subset}) {base['value']:.3g} -> {cand['value']:.3g} ({v})")
    if not parts:
        return "No metric could be compared; see the report for why."
    overall = ("The fine-tune learned the new style" if better > worse else
               "The fine-tune is not clearly better" if better == worse else "The fine-tune is worse")
    return (f"{overall}: {better} metric(s) better, {worse} worse, {len(parts) - better - worse} inconclusive "
            f"at the suite's confidence level. " + "; ".join(parts) + ".")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and bool(np.isfinite(v))
