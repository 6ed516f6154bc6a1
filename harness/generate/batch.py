"""Batched, resumable generation: prompts x seeds x checkpoints -> PNGs + ``generations.jsonl``.

Every image is a *job*: a full parameter dict plus its file name. A job's key is the hash of its
parameters; a finished job has its PNG (parameters in the PNG's text chunks) and a line in
``generations.jsonl``. A rerun skips finished jobs, and a job whose PNG landed but whose line did not
(killed in between) is recovered from the PNG's own text chunk instead of regenerated.

``generations.jsonl``, one line per image::

    {"file": "images/c0_sd/p00000_s1_ab12cd34.png",  # relative to the output folder
     "key": "<sha256 of the parameters>", "checkpoint": "...", "prompt": "...", "negative_prompt": "",
     "seed": 1, "guidance_scale": 7.5, "steps": 30, "scheduler": "ddim" | null (the checkpoint's own),
     "width": 512, "height": 512, "lora": null, "lora_scale": null,
     "scheduler_class": "DDIMScheduler", "finite": true, "stopped_at": null, "seconds": 0.8}

PNG text chunks: ``harness`` (the same record as JSON) and ``parameters`` (A1111's format, which
PNG-info tools show).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError, HarnessError
from harness.io import append_jsonl, atomic_write_bytes, atomic_write_json, read_jsonl
from harness.provenance import record as provenance

log = logging.getLogger(__name__)

# The parameters that define an image; anything else in a record is bookkeeping.
PARAM_KEYS = ("checkpoint", "prompt", "negative_prompt", "seed", "guidance_scale", "steps", "scheduler",
              "width", "height", "lora", "lora_scale")
# Switching these needs a new pipeline / scheduler / batch; everything else batches together.
EXPENSIVE_KEYS = ("checkpoint", "lora", "scheduler", "width", "height", "lora_scale")
JSONL = "generations.jsonl"


@dataclass(frozen=True)
class Job:
    params: dict
    file: str  # relative to the output folder

    @property
    def key(self) -> str:
        return job_key(self.params)


def job_key(params: dict) -> str:
    canon = {k: params.get(k) for k in PARAM_KEYS}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


def make_params(checkpoint, prompt: str, seed: int, *, negative_prompt: str = "", guidance_scale: float = 7.5,
                steps: int = 30, scheduler: str | None = None, width: int = 512, height: int = 512,
                lora: str | None = None, lora_scale: float | None = None) -> dict:
    from harness.models.schedulers import canonical_scheduler

    return {"checkpoint": str(checkpoint), "prompt": str(prompt), "negative_prompt": str(negative_prompt or ""),
            "seed": int(seed), "guidance_scale": float(guidance_scale), "steps": int(steps),
            "scheduler": canonical_scheduler(scheduler) if scheduler else None, "width": int(width),
            "height": int(height), "lora": str(lora) if lora else None,
            "lora_scale": None if lora_scale is None else float(lora_scale)}


# ---- PNG with parameters -------------------------------------------------------------------------------

def a1111_parameters(p: dict) -> str:
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    lines.append(f"Steps: {p['steps']}, Sampler: {p.get('scheduler') or p.get('scheduler_class') or 'default'}, "
                 f"CFG scale: {p['guidance_scale']:g}, Seed: {p['seed']}, Size: {p['width']}x{p['height']}, "
                 f"Model: {p['checkpoint']}")
    return "\n".join(lines)


def png_bytes(image, params: dict) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("harness", json.dumps(params, default=str))
    info.add_itxt("parameters", a1111_parameters(params))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str | Path, image, params: dict) -> Path:
    return atomic_write_bytes(path, png_bytes(image, params))


def read_png_params(path: str | Path) -> dict | None:
    """The ``harness`` parameters of a PNG written by :func:`save_png`, or None (missing/unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.text.get("harness")  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


# ---- running jobs --------------------------------------------------------------------------------------

def pending_jobs(jobs: Sequence[Job], out: Path, jsonl: str = JSONL) -> list[Job]:
    """Jobs not finished in ``out``; PNGs that landed without their jsonl line are recorded now.

    A job is done when *its file* holds an image of *its parameters*: two jobs with the same
    parameters but different files (a held-out set with repeated captions) are both generated."""
    done = {(r.get("file"), r.get("key")) for r in read_jsonl(out / jsonl) if (out / r.get("file", "")).is_file()}
    todo = []
    for job in jobs:
        if (job.file, job.key) in done:
            continue
        path = out / job.file
        meta = read_png_params(path) if path.is_file() else None
        if meta is not None and meta.get("key") == job.key:
            append_jsonl(out / jsonl, {**meta, "file": job.file})
            done.add((job.file, job.key))
            continue
        todo.append(job)
    return todo


def _groups(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs sharing the expensive settings, in batches of ``batch_size``."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(str(job.params.get(k)) for k in EXPENSIVE_KEYS), []).append(job)
    out = []
    for group in groups.values():
        out.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return out


def run_jobs(jobs: Sequence[Job], out: str | Path, *, batch_size: int = 8, device: str | None = None,
             dtype=None, allow_pickle: bool = False, callbacks: Sequence[Callable] = (),
             progress: bool = True, jsonl: str = JSONL, cache=None) -> dict:
    """Generate every unfinished job; returns ``{"generated": n, "skipped": n, "loads": n}``.

    Jobs are grouped by checkpoint/scheduler/size/LoRA (first-appearance order; callers order jobs so
    expensive switches come least) and each group runs in batches through one denoising loop."""
    from harness.generate.pipes import PipelineCache
    from harness.generate.sample import Sample, denoise, to_pil
    from harness.progress import Progress

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = pending_jobs(jobs, out, jsonl)
    skipped = len(jobs) - len(todo)
    if skipped:
        log.info("%d of %d images already exist in %s; generating %d", skipped, len(jobs), out, len(todo))
    cache = cache or PipelineCache(device=device, dtype=dtype, allow_pickle=allow_pickle)
    loads0 = cache.loads
    bar = Progress(total=len(todo), desc="generate", unit="img", disable=not progress)
    for batch in _groups(todo, batch_size):
        p0 = batch[0].params
        # A LoRA is fused into the weights at load time, so its scale is part of the pipeline's identity.
        pipe = cache.get(p0["checkpoint"], lora=p0.get("lora"), lora_scale=p0.get("lora_scale"))
        samples = [Sample(prompt=j.params["prompt"], seed=j.params["seed"], guidance_scale=j.params["guidance_scale"],
                          negative_prompt=j.params["negative_prompt"], steps=j.params["steps"]) for j in batch]
        t0 = time.perf_counter()
        res = denoise(pipe, samples, width=p0["width"], height=p0["height"], scheduler=p0["scheduler"],
                      callbacks=callbacks)
        seconds = (time.perf_counter() - t0) / len(batch)
        sched_class = _class_of(p0["scheduler"]) if p0["scheduler"] else type(pipe.scheduler).__name__
        for job, img, stopped, finite in zip(batch, to_pil(res.images), res.stopped_at, res.finite):
            rec = {"file": job.file, "key": job.key, **job.params, "scheduler_class": sched_class,
                   "finite": finite, "stopped_at": stopped, "seconds": round(seconds, 4)}
            save_png(out / job.file, img, rec)
            append_jsonl(out / jsonl, rec)
        bar.update(len(batch))
    bar.close()
    return {"generated": len(todo), "skipped": skipped, "loads": cache.loads - loads0}


def _class_of(name: str) -> str:
    from harness.models.schedulers import SCHEDULERS

    return SCHEDULERS[name][0]


# ---- harness generate ----------------------------------------------------------------------------------

def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HarnessError(f"{p}: cannot read prompts ({e})") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{p}: no prompts (one per line; '#' starts a comment)")
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(text).rstrip("/")).name)[:40] or "model"


def generation_jobs(checkpoints: Sequence, prompts: Sequence[str], seeds: Sequence[int], **kwargs) -> list[Job]:
    """Jobs for checkpoints x prompts x seeds, checkpoint-major (one model load per checkpoint)."""
    if not checkpoints:
        raise ConfigError("no checkpoint given")
    if not prompts:
        raise ConfigError("no prompts given")
    if not seeds:
        raise ConfigError("no seeds given")
    jobs = []
    for ci, ckpt in enumerate(checkpoints):
        for pi, prompt in enumerate(prompts):
            for seed in seeds:
                params = make_params(ckpt, prompt, seed, **kwargs)
                key = job_key(params)
                jobs.append(Job(params, f"images/c{ci}_{_slug(ckpt)}/p{pi:05d}_s{seed}_{key[:8]}.png"))
    return jobs


def generate(checkpoints: Sequence, prompts: Sequence[str], seeds: Sequence[int], *, out: str | Path,
             negative_prompt: str = "", guidance_scale: float = 7.5, steps: int = 30, scheduler: str | None = None,
             width: int = 512, height: int = 512, lora: str | None = None, lora_scale: float | None = None,
             batch_size: int = 8, device: str | None = None, dtype=None, allow_pickle: bool = False,
             callbacks: Sequence[Callable] = (), progress: bool = True, cache=None) -> dict:
    """Generate every checkpoint x prompt x seed into ``out`` (resumable). Returns counts and paths.
    ``cache``: a :class:`~harness.generate.pipes.PipelineCache` to reuse loaded checkpoints."""
    jobs = generation_jobs(checkpoints, prompts, seeds, negative_prompt=negative_prompt,
                           guidance_scale=guidance_scale, steps=steps, scheduler=scheduler, width=width,
                           height=height, lora=lora, lora_scale=lora_scale)
    out = Path(out)
    counts = run_jobs(jobs, out, batch_size=batch_size, device=device, dtype=dtype, allow_pickle=allow_pickle,
                      callbacks=callbacks, progress=progress, cache=cache)
    atomic_write_json(out / "run.json", provenance(kind="generate", images=len(jobs), **counts,
                                                   seeds=list(seeds), checkpoints=[str(c) for c in checkpoints]))
    return {**counts, "out": str(out), "jsonl": str(out / JSONL), "images": len(jobs)}
