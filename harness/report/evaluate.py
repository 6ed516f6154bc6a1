"""Run an eval suite, then render its report: where the eval stage and the report stage meet.

``harness eval`` and the demo call this; the eval stage itself never renders, and the rest of the
report stage only reads run folders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.eval.runner import EvalResult
from harness.eval.runner import run_eval as _run_suite
from harness.report.html import write_report


def run_eval(suite_path: str | Path, *, report: bool = True, train_run: str | Path | None = None,
             **kwargs) -> EvalResult:
    """``harness.eval.runner.run_eval(suite_path, **kwargs)``, then ``report.html`` on the main process
    (``train_run``'s metrics.jsonl gives its loss curves) unless ``report`` is false."""
    res = _run_suite(suite_path, **kwargs)
    if not report or res.results is None:  # results is None on processes other than the main one
        return res
    return dataclasses.replace(res, report=write_report(res.run_dir, train_run=train_run))
