"""Denoising x-ray: what the latent, the noise estimate and the predicted clean image look like at
every step, as a JSON trace and a strip of previews.

:class:`XrayRecorder` is a plain :func:`~harness.generate.sample.denoise` callback, so the same record
feeds the artifact estimator's early-step hook and the report's trajectory view. Previews use the
fast linear latent-to-RGB map (:func:`harness.models.preview.latent_to_rgb`) at every step and,
every ``vae_every`` steps, a real VAE decode of the predicted clean latent.

Trace JSON (``xray_s{seed}.json``), one entry per scheduler step::

    {"version": 1, "params": {"checkpoint", "prompt", "negative_prompt", "seed", "guidance_scale", "steps",
                              "scheduler", "width", "height"},
     "num_steps": N, "final": "final_s1.png", "strip": "strip_s1.png",
     "steps": [{"step": 0, "timestep": 981.0,
                "latent": {"mean", "std", "min", "max", "channel_mean": [C], "channel_std": [C]},
                "noise_pred": {...same stats...}, "pred_x0": {...same stats...},
                "preview": {"latent": "steps/s1_000_latent.png", "pred_x0": "steps/s1_000_x0.png",
                            "pred_x0_vae": "steps/s1_000_vae.png" (only on VAE steps)}}]}
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from harness.generate.sample import Sample, decode_latents, denoise, to_pil

log = logging.getLogger(__name__)


def tensor_stats(x: torch.Tensor) -> dict:
    """Mean/std/min/max overall and per channel of one sample's (C, h, w) tensor."""
    x = x.detach().float()
    flat = x.flatten(1)
    r = lambda v: round(float(v), 6)  # noqa: E731
    return {"mean": r(x.mean()), "std": r(x.std()), "min": r(x.min()), "max": r(x.max()),
            "channel_mean": [r(v) for v in flat.mean(1)], "channel_std": [r(v) for v in flat.std(1)]}


class XrayRecorder:
    """Records, per sample and step: stats of latent / noise estimate / predicted x0 and previews.

    ``records[i]`` is the list of step entries of sample ``i``; ``previews[i]`` a list of dicts of PIL
    images (keys ``latent``, ``pred_x0`` and, on VAE steps, ``pred_x0_vae``)."""

    def __init__(self, n_samples: int, *, vae_every: int = 0, keep_previews: bool = True):
        self.records: list[list[dict]] = [[] for _ in range(n_samples)]
        self.previews: list[list[dict]] = [[] for _ in range(n_samples)]
        self.vae_every = int(vae_every)
        self.keep_previews = keep_previews

    def __call__(self, state: dict):
        from harness.models.preview import latent_to_rgb

        pipe = state["pipe"]
        lat, eps, x0 = state["latents"], state["noise_pred"], state["pred_x0"]
        if self.keep_previews:
            lat_rgb, x0_rgb = to_pil(latent_to_rgb(lat)), to_pil(latent_to_rgb(x0))
        for j, i in enumerate(state["samples"]):
            k = state["sample_steps"][j]
            self.records[i].append({"step": k, "timestep": round(float(state["timesteps"][j]), 4),
                                    "latent": tensor_stats(lat[j]), "noise_pred": tensor_stats(eps[j]),
                                    "pred_x0": tensor_stats(x0[j])})
            if not self.keep_previews:
                continue
            prev = {"latent": lat_rgb[j], "pred_x0": x0_rgb[j]}
            last = k == state["num_steps"][j] - 1
            if self.vae_every > 0 and (k % self.vae_every == 0 or last):
                prev["pred_x0_vae"] = to_pil(decode_latents(pipe, x0[j:j + 1]))[0]
            self.previews[i].append(prev)
        return None


def strip(previews: list[dict], records: list[dict], size: int, max_cols: int = 20):
    """One image: columns = (up to ``max_cols`` evenly spaced) steps, rows = preview kinds."""
    from harness.generate.grid_draw import draw_grid

    n = len(previews)
    cols = sorted({round(i * (n - 1) / max(1, min(n, max_cols) - 1)) for i in range(min(n, max_cols))})
    kinds = [("latent", "latent (linear)"), ("pred_x0", "predicted x0 (linear)"),
             ("pred_x0_vae", "predicted x0 (VAE)")]
    kinds = [(k, lab) for k, lab in kinds if any(k in previews[c] for c in cols)]
    blank = None
    cells = {}
    for r, (key, _) in enumerate(kinds):
        for c, step in enumerate(cols):
            im = previews[step].get(key)
            if im is None:
                from PIL import Image

                blank = blank or Image.new("RGB", (size, size), (235, 235, 235))
                im = blank
            cells[(r, c)] = [im.resize((size, size), resample=0 if im.width < size else 1)]
    labels = [f"step {records[c]['step']} t={records[c]['timestep']:g}" for c in cols]
    return draw_grid(cells, labels, [lab for _, lab in kinds])[0]


def xray(pipe, prompt: str, *, out: str | Path | None = None, seeds=(0,), steps: int = 30,
         guidance_scale: float = 7.5, negative_prompt: str = "", scheduler: str | None = None, width: int = 512,
         height: int = 512, vae_every: int = 0, checkpoint: str = "", callbacks=()) -> list[dict]:
    """Generate ``prompt`` for each seed, recording every step. Returns one trace dict per seed; with
    ``out`` also writes the traces, per-step previews, strips and final images there."""
    from harness.generate.batch import save_png
    from harness.generate.grid_draw import save_image
    from harness.io import atomic_write_json

    samples = [Sample(prompt=prompt, seed=int(s), guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                      steps=steps) for s in seeds]
    rec = XrayRecorder(len(samples), vae_every=vae_every, keep_previews=out is not None)
    res = denoise(pipe, samples, width=width, height=height, scheduler=scheduler, callbacks=[rec, *callbacks])
    finals = to_pil(res.images)
    traces = []
    for i, s in enumerate(samples):
        params = {"checkpoint": str(checkpoint), "prompt": prompt, "negative_prompt": negative_prompt,
                  "seed": s.seed, "guidance_scale": guidance_scale, "steps": steps, "scheduler": scheduler,
                  "width": width, "height": height}
        trace = {"version": 1, "params": params, "num_steps": len(rec.records[i]), "steps": rec.records[i],
                 "stopped_at": res.stopped_at[i], "finite": res.finite[i]}
        if out is not None:
            out_p = Path(out)
            for entry, prev in zip(trace["steps"], rec.previews[i]):
                files = {}
                for key, suffix in (("latent", "latent"), ("pred_x0", "x0"), ("pred_x0_vae", "vae")):
                    if key in prev:
                        name = f"steps/s{s.seed}_{entry['step']:03d}_{suffix}.png"
                        save_image(out_p / name, prev[key])
                        files[key] = name
                entry["preview"] = files
            trace["final"] = f"final_s{s.seed}.png"
            save_png(out_p / trace["final"], finals[i], params)
            if rec.previews[i]:
                trace["strip"] = f"strip_s{s.seed}.png"
                save_image(out_p / trace["strip"], strip(rec.previews[i], trace["steps"], min(128, width, height)))
            atomic_write_json(out_p / f"xray_s{s.seed}.json", trace)
        traces.append(trace)
    return traces
