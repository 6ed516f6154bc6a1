"""The report's strength sweep: one LoRA on one base at several scales (``--candidate BASE::LORA@SCALE``
repeated), each metric against the scale. The base model is the sweep's scale 0 when it is the LoRA's
base: fused at 0, a LoRA leaves the weights exactly as they were."""

from __future__ import annotations

import base64
from collections import defaultdict

from harness.report import plots


def _groups(ckpts: list[dict]) -> dict[tuple[str, str], list[tuple[float, str]]]:
    groups: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for c in ckpts:
        if c.get("role") == "candidate" and c.get("lora") and c.get("lora_scale") is not None:
            groups[(c.get("lora_base") or "", c["lora"])].append((float(c["lora_scale"]), c["label"]))
    return {k: sorted(v) for k, v in groups.items() if len({s for s, _ in v}) >= 2}


def _best(cells: list[dict], higher_is_better) -> float | None:
    ok = [c for c in cells if isinstance(c.get("value"), (int, float)) and c["value"] == c["value"]]
    if not ok or higher_is_better is None:
        return None
    pick = max if higher_is_better else min
    return pick(ok, key=lambda c: c["value"])["scale"]


def strength_sweeps(results: dict, xlabel: str = "LoRA scale") -> list[dict]:
    """Per swept LoRA: a table (metric x scale: value [CI], difference to the base, verdict), the best
    scale of each metric, and one plot per metric. Empty when no LoRA ran at two scales."""
    ckpts = results.get("checkpoints", [])
    base = next((c for c in ckpts if c.get("role") == "base"), None)
    rows_by = defaultdict(dict)
    order = []
    for r in results.get("rows", []):
        key = (r["metric"], r["subset"])
        if key not in rows_by:
            order.append(key)
        rows_by[key][r["checkpoint"]] = r
    out = []
    for (lora_base, lora), points in _groups(ckpts).items():
        if base is not None and base.get("source") == lora_base and all(s != 0 for s, _ in points):
            points = [(0.0, base["label"]), *points]  # the base itself is this LoRA at scale 0
        table, figures = [], []
        for metric, subset in order:
            cells = []
            for scale, label in points:
                r = rows_by[(metric, subset)].get(label)
                if r is not None:
                    cells.append({"scale": scale, "label": label, **{k: r.get(k) for k in (
                        "value", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high", "verdict", "note")}})
            if len(cells) < 2:
                continue
            hib = next((r.get("higher_is_better") for r in rows_by[(metric, subset)].values()), None)
            table.append({"metric": metric, "subset": subset, "higher_is_better": hib, "cells": cells,
                          "best": _best(cells, hib)})
            series = {"value": [(c["scale"], c["value"], c["ci_low"], c["ci_high"]) for c in cells]}
            png = plots.metric_vs_step(series, metric=f"{metric} ({subset})", higher_is_better=hib, xlabel=xlabel)
            figures.append((f"{metric} / {subset}", "data:image/png;base64," + base64.b64encode(png).decode("ascii")))
        if table:
            out.append({"lora": lora, "base": lora_base, "scales": [s for s, _ in points],
                        "labels": [lab for _, lab in points], "table": table, "figures": figures})
    return out
