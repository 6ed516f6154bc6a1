"""Regression gates: a suite's thresholds applied to every candidate's rows."""

from __future__ import annotations

from harness.eval.suite import Suite
from harness.eval.verdict import GateResult, check_gate


def evaluate(suite: Suite, rows: list[dict], ckpts) -> tuple[list[GateResult], list[str]]:
    """One result per gate rule x candidate x prompt set. A gated metric that was skipped (optional,
    its model not given) is noted, not failed; a metric that was computed but came out NaN fails."""
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
                r = by.get((label, ck.label, subset))
                b = by.get((label, base.label, subset))
                value = _num(r["value"]) if r else float("nan")
                base_value = _num(b["value"]) if b else float("nan")
                for rule, threshold in gate.rules():
                    compared, passed = check_gate(rule, threshold, value, base_value)
                    out.append(GateResult(gate=label, rule=rule, threshold=float(threshold), checkpoint=ck.label,
                                          subset=subset, value=compared, passed=passed))
    return out, notes


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def format_table(results: list[GateResult]) -> str:
    """A plain-text table of gate results for the terminal."""
    head = ("gate", "checkpoint", "prompt set", "rule", "threshold", "value", "result")
    body = [(g.gate, g.checkpoint, g.subset, g.rule, f"{g.threshold:g}", f"{g.value:.4g}",
             "pass" if g.passed else "FAIL") for g in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
