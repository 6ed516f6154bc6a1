"""Regression gates: a suite's thresholds applied to every candidate's rows."""

from __future__ import annotations

import math

from harness.eval.suite import Suite
from harness.eval.verdict import GateResult, check_gate


def evaluate(suite: Suite, rows: list[dict], ckpts) -> tuple[list[GateResult], list[str]]:
    """One result per gate rule x candidate x prompt set. A gated metric that was skipped (optional,
    its model not given) is noted; a row without a value (not computed: too few images, no
    detections, ...) gives a gate that is "not evaluated", never a pass or a FAIL, with the row's
    reason. ``harness eval --strict`` turns those into an error."""
    out, notes = [], []
    by = {(r["metric"], r["checkpoint"], r["subset"]): r for r in rows}
    base = next(c for c in ckpts if c.role == "base")
    for label, gate in suite.gates.items():
        subsets = [gate.subset] if gate.subset else list(suite.subsets_of(label))
        if not any(r["metric"] == label for r in rows):
            notes.append(f"gate {label!r} not evaluated: the metric was skipped")
            continue
        for ck in ckpts:
            if ck.role != "candidate":
                continue
            for subset in subsets:
                r, b = by.get((label, ck.label, subset)), by.get((label, base.label, subset))
                for rule, threshold in gate.rules():
                    out.append(_one(label, rule, float(threshold), ck.label, subset, r, b))
    missing = [g for g in out if not g.evaluated]
    notes += [f"gate {g.gate!r} {g.rule} on {g.checkpoint} ({g.subset}) not evaluated: {g.reason}" for g in missing]
    return out, notes


def _one(label, rule, threshold, checkpoint, subset, r, b) -> GateResult:
    value = _num(r["value"]) if r else float("nan")
    base_value = _num(b["value"]) if b else float("nan")
    relative = rule in ("max_increase", "max_decrease")
    gone = [x for x, v in ((r, value), *(((b, base_value),) if relative else ())) if not math.isfinite(v)]
    if gone:
        why = next((x.get("note") for x in gone if x and x.get("note")), None) or "the metric has no value"
        return GateResult(gate=label, rule=rule, threshold=threshold, checkpoint=checkpoint, subset=subset,
                          value=float("nan"), passed=False, evaluated=False, reason=why)
    compared, passed = check_gate(rule, threshold, value, base_value)
    return GateResult(gate=label, rule=rule, threshold=threshold, checkpoint=checkpoint, subset=subset,
                      value=compared, passed=passed)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def format_table(results: list[GateResult]) -> str:
    """A plain-text table of gate results for the terminal."""
    head = ("gate", "checkpoint", "prompt set", "rule", "threshold", "value", "result")
    body = [(g.gate, g.checkpoint, g.subset, g.rule, f"{g.threshold:g}", f"{g.value:.4g}", g.result)
            for g in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
