"""Checkpoint loading for generation: a thin seam over :func:`harness.models.load.load_pipeline`.

Grids and batch generation hold one pipeline at a time and switch checkpoints as rarely as the plan
allows, so loading goes through :class:`PipelineCache`, which keeps only the most recent checkpoint.
"""

from __future__ import annotations

import logging
import os

import torch

from harness.errors import ConfigError

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load(source, *, device: str | None = None, dtype: torch.dtype | None = None, lora: str | None = None,
         lora_scale: float | None = None, allow_pickle: bool = False):
    """A ``StableDiffusionPipeline`` for ``source`` (hub id, diffusers folder, single file, or
    ``BASE::LORA@SCALE``), with ``lora`` fused at ``lora_scale`` (default 1)."""
    from harness.models.load import load_pipeline
    from harness.models.lora_spec import is_spec

    if not isinstance(source, (str, bytes, os.PathLike)) and hasattr(source, "unet"):
        return source  # already a pipeline (tests, notebooks)
    if is_spec(source) and (lora is not None or lora_scale is not None):
        raise ConfigError(f"{source}: names its LoRA and scale already; do not pass --lora/--lora-scale as well")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    return load_pipeline(str(source), dtype=dtype, device=device, lora=lora,
                         lora_scale=1.0 if lora_scale is None else float(lora_scale), allow_pickle=allow_pickle)


class PipelineCache:
    """Holds the pipeline of the last requested checkpoint; loading another frees the previous one."""

    def __init__(self, **load_kwargs):
        self.load_kwargs = load_kwargs
        self.key = None
        self.pipe = None
        self.loads = 0

    def get(self, source, lora: str | None = None, lora_scale: float | None = None):
        key = (source if isinstance(source, str) else id(source), lora, lora_scale if lora else None)
        if key != self.key:
            self.pipe = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("loading checkpoint %s", source)
            self.pipe = load(source, lora=lora, lora_scale=lora_scale, **self.load_kwargs)
            self.key = key
            self.loads += 1
        return self.pipe
