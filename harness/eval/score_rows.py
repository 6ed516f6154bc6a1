"""What every metric of a suite shares: the :class:`Scoring` inputs (run folder, suite, checkpoints,
per-image records, reference images, cached extractors) and the tidy rows with intervals and verdicts
the metrics append to it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from harness.eval import layout
from harness.eval.plan import Checkpoint, Item
from harness.eval.suite import Suite
from harness.eval.verdict import verdict


@dataclass
class Scoring:
    """Inputs shared by every metric, and what they produce."""

    run_dir: Path
    suite: Suite
    ckpts: list[Checkpoint]
    items: list[Item]
    per_image: list[dict]  # one record per checkpoint x item, in checkpoint-major item order
    reference: list[Path]
    cache_dir: Path
    device: str = "cpu"
    progress: bool = False
    allow_pickle: bool = False
    rows: list[dict] = field(default_factory=list)
    breakdowns: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _extractors: dict = field(default_factory=dict)

    @property
    def base(self) -> Checkpoint:
        return self.ckpts[0]

    def records(self, label: str, subset: str) -> list[dict]:
        return [r for r in self.per_image if r["checkpoint"] == label and r["subset"] == subset]

    def usable(self, label: str, subset: str) -> list[dict]:
        """Records whose image exists and whose latents were finite (NaN/Inf samples are marked, not scored)."""
        return [r for r in self.records(label, subset) if not r["nonfinite"] and r.get("image")]

    def path(self, r: dict) -> Path:
        return layout.resolve(self.run_dir, r["image"])

    def extractor(self, spec: str):
        if spec not in self._extractors:
            from harness.metrics.features import get_extractor

            self._extractors[spec] = get_extractor(spec, device=self.device)
        return self._extractors[spec]


def row(ckpt: Checkpoint, label: str, name: str, subset: str, value, ci_low, ci_high, n, hib, note=None) -> dict:
    return {"checkpoint": ckpt.label, "role": ckpt.role, "step": ckpt.step, "metric": label, "metric_name": name,
            "subset": subset, "value": _f(value), "ci_low": _f(ci_low), "ci_high": _f(ci_high), "n": n,
            "higher_is_better": hib, "diff": None, "diff_ci_low": None, "diff_ci_high": None, "verdict": None,
            "note": note}


def _f(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def set_diff(r: dict, diff: tuple[float, float, float], margin: float) -> None:
    d, lo, hi = (_f(x) for x in diff)
    # a zero-width interval around a nonzero difference measures no noise (e.g. one image a side):
    # it is shown, but never turned into a verdict
    degenerate = lo is not None and hi is not None and lo == hi and d not in (None, 0.0)
    r.update(diff=d, diff_ci_low=lo, diff_ci_high=hi,
             verdict="inconclusive" if degenerate else verdict(lo, hi, r["higher_is_better"], margin))
