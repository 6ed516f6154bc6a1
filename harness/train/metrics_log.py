"""The run's numbers: ``metrics.jsonl`` (one JSON object per logged step, read by the report) and
accelerate's trackers (TensorBoard by default). Only the main process writes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from harness.io import append_jsonl, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


def memory_stats(device: torch.device | None = None) -> dict[str, float]:
    """Peak GPU memory (MiB) when on a GPU, and the process's peak resident memory (MiB)."""
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    out = {"cpu_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale}
    if device is not None and device.type == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def available_trackers(requested: list[str]) -> list[str]:
    """Keep the trackers whose package is installed; say which were dropped."""
    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    keep = []
    for name in requested:
        if importlib.util.find_spec(packages.get(name, name)) is None:
            log.warning("logging.trackers: %r is not installed; not logging to it (pip install %s)", name,
                        packages.get(name, name))
        else:
            keep.append(name)
    return keep


def flat_config(d: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys with plain values, as trackers take it."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class MetricsLog:
    """Appends records to ``RUN/metrics.jsonl`` and forwards numbers to accelerate's trackers."""

    def __init__(self, accelerator, run_dir: str | Path):
        self.accelerator = accelerator
        self.path = Path(run_dir) / METRICS
        self._t0 = time.perf_counter()

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run logged after its last checkpoint (they will be redone)."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, default=str) + "\n" for r in kept))

    def write(self, step: int, values: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "time_s": round(time.perf_counter() - self._t0, 3), **values}
        append_jsonl(self.path, record)
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self.accelerator.log(numeric, step=step)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run, for reports and plots."""
    return read_jsonl(Path(run_dir) / METRICS)


class StepTimer:
    """Seconds spent per phase of a step (data, encode, unet, optimizer), when ``logging.timing`` is on.
    GPU work is asynchronous, so each phase synchronises the device first and last."""

    def __init__(self, enabled: bool, device: torch.device | None = None):
        self.enabled, self.device = enabled, device
        self.totals: dict[str, float] = {}
        self.steps = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pop(self) -> dict[str, float]:
        """Mean seconds per step of each phase since the last pop."""
        out = {f"time_{k}_s": v / max(self.steps, 1) for k, v in self.totals.items()}
        self.totals, self.steps = {}, 0
        return out
