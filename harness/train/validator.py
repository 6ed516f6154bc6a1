"""Validation during training: a loss comparable across steps and runs, fixed-seed samples, an
optional scoring hook, and early stopping.

The validation loss uses fixed timesteps and fixed noise per held-out item (drawn from
``noise_seed``), so its changes come from the weights alone. Samples use the recipe's prompts and
seeds and are written as PNG with the prompt, seed and step in their text chunks. Scorers are plain
callables ``(images, prompts) -> float`` so any metric can watch a model "fry" while it trains.
:class:`Validator` runs them all at a step of the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.errors import ConfigError
from harness.io import atomic_write
from harness.train import checkpoint as ckpt
from harness.train import losses
from harness.train.cache import encode_latent_dist, sample_latents
from harness.train.data import Data
from harness.train.models import Models
from harness.train.recipe import Recipe
from harness.train.timesteps import evenly_spaced

log = logging.getLogger(__name__)

Scorer = Callable[[list, list[str]], float]


@dataclass
class ValItem:
    dist: torch.Tensor  # [2C, h, w] latent distribution
    hidden: torch.Tensor  # [77, D] text-encoder output


@torch.no_grad()
def validation_loss(unet, items: list[ValItem], timesteps: list[int], alphas_cumprod: torch.Tensor,
                    prediction_type: str, scaling_factor: float, noise_seed: int) -> dict[str, float]:
    """Mean MSE over items x timesteps with noise fixed by (noise_seed, item); also per timestep."""
    device, dtype = unet.device, unet.dtype
    per_t = np.zeros(len(timesteps))
    t = torch.tensor(timesteps, dtype=torch.long)
    for i, item in enumerate(items):
        g = torch.Generator().manual_seed(noise_seed * 1_000_003 + i)
        x0 = sample_latents(item.dist[None], scaling_factor, g).expand(len(timesteps), -1, -1, -1)
        noise = torch.randn(x0.shape, generator=g)
        noisy = losses.add_noise(x0, noise, t, alphas_cumprod)
        hidden = item.hidden[None].expand(len(timesteps), -1, -1)
        pred = unet(noisy.to(device, dtype), t.to(device), hidden.to(device, dtype), return_dict=False)[0]
        tgt = losses.target(prediction_type, x0, noise, t, alphas_cumprod).to(device)
        per_t += ((pred.float() - tgt.float()) ** 2).mean(dim=(1, 2, 3)).cpu().numpy()
    per_t /= max(1, len(items))
    out = {"val_loss": float(per_t.mean())}
    out.update({f"val_loss/t={ts}": float(v) for ts, v in zip(timesteps, per_t)})
    return out


def save_png(path: Path, image, info: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(str(k), str(v))
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=meta))


@torch.no_grad()
def generate_samples(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                     resolution: int, out_dir: Path | None, step: int) -> list[tuple[str, int, object]]:
    """One image per (prompt, seed); written to ``out_dir/pNN-sSEED.png`` when ``out_dir`` is given."""
    out = []
    for pi, prompt in enumerate(prompts):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                         guidance_scale=guidance, generator=g).images[0]
            if out_dir is not None:
                info = {"prompt": prompt, "seed": seed, "step": step, "num_inference_steps": steps,
                        "guidance_scale": guidance}
                save_png(out_dir / f"p{pi:02d}-s{seed}.png", image, info)
            out.append((prompt, seed, image))
    return out


def drift_scorer(reference: list) -> Scorer:
    """RMS pixel distance (0..1) of each sample from the base model's sample for the same prompt and
    seed: how far the fine-tune has moved from where it started."""
    ref = [np.asarray(im, dtype=np.float32) / 255 for im in reference]

    def score(images: list, prompts: list[str]) -> float:
        if len(images) != len(ref):
            raise ValueError(f"drift: expected {len(ref)} images (one per reference), got {len(images)}")
        return float(np.mean([np.sqrt(((np.asarray(im, dtype=np.float32) / 255 - r) ** 2).mean())
                              for im, r in zip(images, ref)]))

    return score


def clip_score_scorer(spec: str, device="cpu") -> Scorer:
    """Mean CLIP score of the samples against their prompts (``spec``: 'clip:NAME_OR_DIR' or 'hf:...')."""
    from harness.metrics.clip_score import CLIPScore

    metric = CLIPScore(spec, device=device)

    def score(images: list, prompts: list[str]) -> float:
        metric.reset()
        metric.update(images, list(prompts))
        return float(metric.compute())

    return score


def artifact_scorer(spec: str, device="cpu") -> Scorer:
    """Mean predicted artifact rating (0 clean .. 5 ruined) of the learned estimator at ``spec``."""
    from harness.estimator.score import ArtifactEstimator
    from harness.metrics.images import to_batch

    est = ArtifactEstimator.load(spec, device=device)

    def score(images: list, prompts: list[str]) -> float:
        return float(est.score_images(to_batch(images, None)).float().mean())

    return score


BUILTIN_SCORERS = ("drift",)
# name -> builder(model spec, device); the spec comes from validation.scorer_models[name]
SCORER_BUILDERS: dict[str, Callable[..., Scorer]] = {"clip_score": clip_score_scorer, "artifact": artifact_scorer}


def check_scorers(names: list[str], given: dict[str, Scorer], models: dict[str, str]) -> None:
    """Every name in ``validation.eval_metrics`` must be built in, passed to ``train(scorers=...)``, or a
    :data:`SCORER_BUILDERS` name with its model in ``validation.scorer_models``."""
    for name in names:
        if name in BUILTIN_SCORERS or name in given:
            continue
        if name in SCORER_BUILDERS:
            if name not in models:
                raise ConfigError(f"key 'validation.eval_metrics' has {name!r}: set validation.scorer_models."
                                  f"{name} to its model (e.g. clip:ViT-B-32:openai, or an estimator folder)")
            continue
        known = sorted(set(BUILTIN_SCORERS) | set(SCORER_BUILDERS) | set(given))
        raise ConfigError(f"key 'validation.eval_metrics' has {name!r}: no such scorer; known: {', '.join(known)}")


def build_scorers(names: list[str], given: dict[str, Scorer], models: dict[str, str], device="cpu") -> dict:
    out = dict(given)
    for name in names:
        if name not in out and name in SCORER_BUILDERS:
            out[name] = SCORER_BUILDERS[name](models[name], device=device)
    return out


@dataclass
class EarlyStopping:
    """Stop after ``patience`` validations without an improvement of at least ``min_delta``."""

    patience: int | None
    mode: str = "min"
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    history: list = field(default_factory=list)

    def update(self, step: int, value: float) -> bool:
        """Record a validation value; True when training should stop."""
        self.history.append((step, value))
        if not math.isfinite(value):
            self.bad += 1
        elif self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                   else value > self.best + self.min_delta):
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return self.patience is not None and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load(self, state: dict) -> None:
        self.best, self.best_step, self.bad = state.get("best"), state.get("best_step"), state.get("bad", 0)


# ---------------------------------------------------------------- during training

class Validator:
    """Validation loss on held-out items, fixed-seed samples and scorers. Runs on the main process; with
    sharded parameters (FSDP2, ZeRO-3) on every process (each forward gathers the shards from all of them), with only the main
    process writing samples and scoring them."""

    def __init__(self, recipe: Recipe, models: Models, data: Data, latent_cache, text_fn, run_dir: Path,
                 scorers: dict[str, Scorer], main: bool = True):
        v = recipe.validation
        self.recipe, self.models, self.run_dir, self.main = recipe, models, run_dir, main
        self.scorers = build_scorers(list(v.eval_metrics), scorers, dict(v.scorer_models),
                                     models.unet.device) if main else {}
        stage0 = recipe.resolved_stages()[0]
        self.timesteps = list(v.timesteps) if v.timesteps else evenly_spaced(
            stage0.t_min, stage0.t_max or models.num_train_timesteps)
        self.items = self._val_items(data.val, latent_cache, text_fn, v.max_items)
        self.stopper = EarlyStopping(v.early_stopping_patience, v.early_stopping_mode, v.early_stopping_min_delta)
        if not self.items:
            log.info("no validation split in %s (metadata 'split' column, val/ folder or data.val_fraction): "
                     "no validation loss", recipe.data.root)

    @torch.no_grad()
    def _val_items(self, dataset, latent_cache, text_fn, max_items) -> list[ValItem]:
        if dataset is None:
            return []
        n = min(len(dataset), max_items or len(dataset))
        items = []
        for i in range(n):
            it = dataset[i]
            if latent_cache is not None:
                dist = latent_cache.get(latent_cache.fill(dataset, [i])[i])
            else:
                dist = encode_latent_dist(self.models.pipe.vae, it["pixel_values"][None])[0]
            items.append(ValItem(dist=dist.cpu(), hidden=text_fn([it["caption"]])[0].float().cpu()))
        return items

    def run(self, step: int, unet, text_encoder) -> dict:
        out: dict = {}
        was_training = unet.training
        unet.eval()
        dtype = self.models.weight_dtype
        amp = torch.autocast(unet.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        samples = []
        try:
            with amp:  # the model as it trains; the scorers below run as they do in 'harness eval'
                if self.items:
                    out.update(validation_loss(unet, self.items, self.timesteps, self.models.alphas_cumprod,
                                               self.models.prediction_type, self.models.scaling_factor,
                                               self.recipe.validation.noise_seed))
                if self.recipe.validation.prompts:
                    samples = self._samples(step, unet, text_encoder)
        finally:
            unet.train(was_training)
        if samples and self.main:
            out.update(self._score(samples))
        return out

    def _samples(self, step: int, unet, text_encoder) -> list:
        from diffusers import StableDiffusionPipeline

        v = self.recipe.validation
        pipe = StableDiffusionPipeline(**{**self.models.pipe.components, "unet": unet, "text_encoder": text_encoder})
        pipe.set_progress_bar_config(disable=True)
        samples = generate_samples(pipe, list(v.prompts), list(v.seeds), steps=v.num_inference_steps,
                                   guidance=v.guidance_scale, resolution=self.recipe.data.resolution,
                                   out_dir=self.run_dir / "samples" / ckpt.checkpoint_name(step) if self.main
                                   else None, step=step)
        return samples

    def _score(self, samples: list) -> dict:
        """The eval hook's scores of the fixed-seed samples, in full precision whatever the run trains in,
        so they compare with the eval suite's numbers."""
        v = self.recipe.validation
        images, prompts = [s[2] for s in samples], [s[0] for s in samples]
        if "drift" in v.eval_metrics and "drift" not in self.scorers:
            self.scorers["drift"] = drift_scorer(self._reference(images))
        return {f"eval/{name}": float(self.scorers[name](images, prompts)) for name in v.eval_metrics}

    def _reference(self, images: list) -> list:
        """The base model's samples: step 0's PNGs (also after a resume), else these images."""
        from PIL import Image

        v = self.recipe.validation
        folder = self.run_dir / "samples" / ckpt.checkpoint_name(0)
        paths = [folder / f"p{pi:02d}-s{seed}.png" for pi in range(len(v.prompts)) for seed in v.seeds]
        if all(p.is_file() for p in paths):
            return [Image.open(p).convert("RGB") for p in paths]
        return images

    def should_stop(self, step: int, results: dict) -> bool:
        metric = self.recipe.validation.early_stopping_metric
        if metric not in results:
            return False
        return self.stopper.update(step, results[metric])
