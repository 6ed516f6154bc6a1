"""What every result records about how it was made: versions, hardware, command, hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

_PACKAGES = (
    "harness", "torch", "torchvision", "diffusers", "transformers", "accelerate", "peft",
    "torchmetrics", "open_clip_torch", "ultralytics", "numpy", "pillow", "scikit-learn",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def hardware() -> dict[str, str | int]:
    info: dict[str, str | int] = {"platform": platform.platform(), "cpu_count": os.cpu_count() or 0}
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str:
    """Hash of a file, or of every file under a folder (names and contents, in sorted order)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def record(**extra) -> dict:
    """The provenance block written next to results."""
    return {"versions": versions(), "hardware": hardware(), "command": command(), **extra}
