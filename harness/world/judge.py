"""Checks on the demo's artifact verdict: is the estimator fooled by style, and what does a judge that
cannot see style say?

The artifact estimator sees one image at a time. Held-out clean digits in every ink and paper show
how far a clean restyle alone moves its score (:func:`style_check`). The digit classifier reads
min-max-normalised ink maps, so colours do not reach it: how often it recognises the prompted digit,
and how sure it is, is an artifact measure independent of style (:func:`independent_judge`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harness.world import digits_data as DD


def style_check(world: Path, n: int = 120, seed: int = 0) -> dict:
    """Mean artifact score of ``n`` clean held-out digits per named style, and the demo style's gap
    over plain black on white (what a perfectly clean restyle costs on the artifact score)."""
    from harness.estimator.score import ArtifactEstimator

    est = ArtifactEstimator.load(world / "estimator", vae_source=world / "sd")
    ink, y = DD.load_ink()
    _, held = DD.split_indices(len(y), seed)
    idx = torch.as_tensor(held[:n])
    gen = torch.Generator().manual_seed(seed + 5)
    scores = {}
    for style in [DD.PLAIN, DD.DEMO_STYLE, *[s for s in DD.all_styles() if s not in (DD.PLAIN, DD.DEMO_STYLE)]]:
        inks, papers = DD.jitter_colours(len(idx), np.zeros(len(idx), int), [style], gen)
        images = torch.as_tensor(DD.to_uint8(DD.render(ink[idx], inks, papers))).permute(0, 3, 1, 2)
        scores[" on ".join(style)] = float(est.score_images(images).mean())
    plain, demo = scores[" on ".join(DD.PLAIN)], scores[" on ".join(DD.DEMO_STYLE)]
    return {"n": len(idx), "clean_score_by_style": scores, "plain": plain, "demo_style": demo,
            "demo_style_gap": demo - plain, "spread": max(scores.values()) - min(scores.values())}


def _prompted_digit(prompt: str) -> int | None:
    found = [i for i, w in enumerate(DD.DIGIT_WORDS) if f" {w}" in f" {prompt}"]
    return found[0] if len(found) == 1 else None


def independent_judge(eval_dir: Path, records: list[dict], seed: int = 0) -> dict:
    """Per checkpoint: share of its images the digit classifier reads as the prompted digit, and the
    classifier's mean probability of it (records: per_image.jsonl rows of one prompt set)."""
    from PIL import Image

    from harness.world.digits_judges import digit_classifier, ink_features

    clf = digit_classifier(seed)
    out = {}
    for ck in sorted({r["checkpoint"] for r in records}):
        rows = [(r, _prompted_digit(r["prompt"])) for r in records if r["checkpoint"] == ck and r.get("image")]
        rows = [(r, d) for r, d in rows if d is not None and not r.get("nonfinite")]
        if not rows:
            continue
        images = np.stack([np.asarray(Image.open(eval_dir / r["image"]).convert("RGB")) for r, _ in rows])
        labels = np.array([d for _, d in rows])
        proba = clf.predict_proba(ink_features(images))
        col = {c: i for i, c in enumerate(clf.classes_)}
        p = proba[np.arange(len(labels)), [col[d] for d in labels]]
        out[ck] = {"n": len(rows), "accuracy": float((proba.argmax(1) == [col[d] for d in labels]).mean()),
                   "confidence": float(p.mean())}
    return out


def artifact_sentence(style: dict, judge: dict, base: str = "base") -> str:
    """One or two sentences for the verdict paragraph and the report."""
    if not style:
        return ""
    text = (f"Artifact score and style: clean held-out digits in {' on '.join(DD.DEMO_STYLE)} score "
            f"{style['demo_style']:.2f} against {style['plain']:.2f} in {' on '.join(DD.PLAIN)} "
            f"({style['demo_style_gap']:+.2f} for a restyle with no artifacts at all), so a fine-tune that "
            "learned the new style reads as 'worse' on it by about that much.")
    cands = [k for k in judge if k != base]
    if base in judge and cands:
        b, c = judge[base], judge[cands[0]]
        text += (f" A judge blind to colour (the digit classifier on ink maps) recognises the prompted digit in "
                 f"{100 * b['accuracy']:.0f}% of the base's images (mean probability {b['confidence']:.2f}) and "
                 f"{100 * c['accuracy']:.0f}% of the fine-tune's ({c['confidence']:.2f}).")
    return text
