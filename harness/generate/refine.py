"""SDEdit late-step refinement: encode an image, noise it part way, denoise only the remaining steps.

``strength`` is the fraction of the schedule that is re-run (0: the input back, up to the VAE round
trip; 1: a fresh generation); ``timestep`` picks the start by noise level instead (the late-steps
recipe's "noise to t=500"). Several strengths run in one batch: each sample has its own schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.generate.images import rgb_tensor
from harness.generate.sample import Output, Sample, denoise, encode_images, schedule

log = logging.getLogger(__name__)


def strength_for_timestep(pipe, timestep: int, steps: int, scheduler: str | None = None) -> float:
    """The largest strength whose remaining schedule starts at a timestep <= ``timestep`` (so a
    refine "from t = 500" never runs a step above 500; schedules such as PNDM's repeat a timestep,
    so the start is found on the actual slice, not by counting)."""
    n_train = pipe.scheduler.config.num_train_timesteps
    if not 0 <= int(timestep) < n_train:
        raise ConfigError(f"timestep must be in [0, {n_train}); got {timestep}")
    templates: dict = {}
    for run in range(steps, 0, -1):
        strength = min(1.0, (run + 1e-6) / steps)
        _, ts = schedule(pipe, scheduler, steps, strength, _templates=templates)
        if len(ts) and int(ts[0]) <= int(timestep):
            return strength
    return 0.0


@torch.inference_mode()
def refine(pipe, images: Sequence, prompt: str, *, strengths: Sequence[float] = (0.3,), timestep: int | None = None,
           seed: int = 0, steps: int = 30, guidance_scale: float = 7.5, negative_prompt: str = "",
           scheduler: str | None = None, callbacks=()) -> tuple[Output, list[Sample]]:
    """Refine every image at every strength (image-major order). ``images``: paths or PIL RGB images.

    Returns the batched :class:`Output` and the samples (their ``strength`` says which is which)."""
    if not images:
        raise ConfigError("no images to refine")
    if timestep is not None:
        strengths = [strength_for_timestep(pipe, timestep, steps, scheduler)]
    if not strengths:
        raise ConfigError("strengths: give at least one strength in [0, 1]")
    pixels = [rgb_tensor(im, name=f"image {i}") for i, im in enumerate(images)]
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) != 1:
        raise ConfigError(f"images have different sizes {sorted(s[2:] for s in shapes)}; refine one size at a time")
    h, w = pixels[0].shape[2:]
    latents = encode_images(pipe, torch.cat(pixels))
    samples, init = [], []
    for i in range(len(pixels)):
        for s in strengths:
            samples.append(Sample(prompt=prompt, seed=seed, guidance_scale=guidance_scale,
                                  negative_prompt=negative_prompt, steps=steps, strength=float(s)))
            init.append(latents[i:i + 1])
    out = denoise(pipe, samples, width=w, height=h, scheduler=scheduler, init_latents=torch.cat(init),
                  callbacks=callbacks)
    return out, samples


def refine_to_dir(pipe, image_paths: Sequence[str | Path], prompt: str, out: str | Path, **kwargs) -> dict:
    """Refine files into ``out``: one PNG per (image, strength) with parameters, a sweep grid
    (rows: images, columns: input then each strength) and ``refine.json``."""
    from harness.generate.batch import save_png
    from harness.generate.grid_draw import draw_grid, save_image
    from harness.generate.images import open_image
    from harness.generate.sample import to_pil
    from harness.io import atomic_write_json
    from harness.provenance import record as provenance

    out = Path(out)
    res, samples = refine(pipe, image_paths, prompt, **kwargs)
    per = len(samples) // len(image_paths)
    pils = to_pil(res.images)
    records, cells = [], {}
    for i, path in enumerate(image_paths):
        cells[(i, 0)] = [open_image(path).convert("RGB")]
        for j in range(per):
            s = samples[i * per + j]
            name = f"refined/{Path(str(path)).stem}_i{i}_strength{s.strength:.3f}.png"
            rec = {"file": name, "input": str(path), "prompt": prompt, "strength": s.strength, "seed": s.seed,
                   "steps": s.steps, "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt,
                   "scheduler": kwargs.get("scheduler"), "timestep": kwargs.get("timestep"),
                   "finite": res.finite[i * per + j]}
            save_png(out / name, pils[i * per + j], {**rec, "checkpoint": "", "width": pils[0].width,
                                                        "height": pils[0].height})
            records.append(rec)
            cells[(i, j + 1)] = [pils[i * per + j]]
    cols = ["input"] + [f"strength: {samples[j].strength:.2f}" for j in range(per)]
    rows = [Path(str(p)).name for p in image_paths]
    canvas, _ = draw_grid(cells, cols, rows, title=f"refine: {prompt}",
                          legend=[f"steps: {samples[0].steps}, cfg: {samples[0].guidance_scale:g}, "
                                  f"seed: {samples[0].seed}, scheduler: {kwargs.get('scheduler') or 'default'}"])
    save_image(out / "sweep.png", canvas)
    data = {"version": 1, "images": records, "sweep": "sweep.png", "provenance": provenance(kind="refine")}
    if hasattr(pipe.unet, "specs"):  # a chain of timestep experts: who owned what, and what each ran
        data["experts"] = [{"source": s.source, "t_min": s.t_min, "t_max": s.t_max} for s in pipe.unet.specs]
        data["denoised_by"] = dict(pipe.unet.calls)
    atomic_write_json(out / "refine.json", data)
    return data
