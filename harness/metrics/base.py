"""What all harness metrics share: canonical sample order, result records with provenance."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.utilities import dim_zero_cat

from harness.metrics.images import RESIZE_MODE


def cat_state(state, dim: int | None = None) -> torch.Tensor:
    """A ``cat`` list state (or its synced tensor) as one tensor; empty -> [0, dim]."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, dim or 0)
    return dim_zero_cat(state)


def canonical_order(x: np.ndarray) -> np.ndarray:
    """Row order that depends only on the rows' values, not on which process or batch saw them first.

    Random subsets (KID), reservoirs and k-means initialisation then give the same answer in one
    process and split over several. Key: a fixed random projection, then the first column.
    """
    if len(x) == 0:
        return np.arange(0)
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    r = np.random.default_rng(12345).standard_normal(x.shape[1])
    return np.lexsort((x[:, 0], x @ r))


def record(metric: str, value, *, n_a: int, n_b: int | None, extra: dict | None = None,
           ci: dict | None = None, warnings: list[str] | None = None) -> dict:
    """One result: the value, its interval, counts, and how it was made."""
    from harness.provenance import versions

    ci = ci or {}
    out = {
        "metric": metric, "value": value, "ci_low": ci.get("ci_low"), "ci_high": ci.get("ci_high"),
        "n_a": n_a, "n_b": n_b, "resize": RESIZE_MODE, "input_dtype": "uint8",
    }
    out.update({k: v for k, v in ci.items() if k not in ("ci_low", "ci_high")})
    out.update(extra or {})
    out["warnings"] = list(warnings or [])
    out["versions"] = versions()
    return out
