"""Calibration of the verdicts: how often two samples of one model get "better"/"worse" (target: at
most alpha), how often a planted shift is caught, and whether every interval contains its estimate.

Synthetic Gaussian features (``harness.eval.calibration``): a reference set, and paired base/candidate
sets that share a per-pair component (as images of one prompt and seed do). The candidate is drawn
like the base (null) or shifted by ``--shifts`` standard deviations on every axis (power). Each rate
comes with its exact binomial 95% interval.

    python benchmarks/calibration.py [--trials 200] [--n 100] [--dim 8] [--shifts 0 0.1 0.2] [--out calibration.json]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from harness.eval.calibration import METRICS, Study, run
from harness.io import atomic_write_json

log = logging.getLogger("calibration")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=list(METRICS))
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--n", type=int, default=100, help="images per model")
    p.add_argument("--n-ref", type=int, default=100, help="reference images")
    p.add_argument("--dim", type=int, default=8, help="feature dimension")
    p.add_argument("--n-perm", type=int, default=200)
    p.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    study = Study(trials=args.trials, n=args.n, n_ref=args.n_ref, dim=args.dim, n_perm=args.n_perm)
    rows = []
    print("| metric | shift (sd) | decided (null: false-verdict rate) | 95% CI | right direction | "
          "interval contains estimate |\n|---|---|---|---|---|---|")
    for metric in args.metrics:
        for shift in args.shifts:
            t0 = time.time()
            r = run(study, metric, shift)
            rows.append(r)
            d = r["decided"]
            print(f"| {metric} | {shift:g} | {d['rate']:.3f} ({d['k']}/{d['n']}) | [{d['ci_low']:.3f}, "
                  f"{d['ci_high']:.3f}] | {r['right_direction']['rate']:.3f} | "
                  f"{r['interval_contains_estimate']:.3f} |", flush=True)
            log.info("%s shift %g: %.0f s", metric, shift, time.time() - t0)
    if args.out:
        atomic_write_json(args.out, {"study": vars(study) if hasattr(study, "__dict__") else str(study),
                                     "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
