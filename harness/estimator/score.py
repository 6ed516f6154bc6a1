"""Scoring with a trained estimator: final images, latents at any timestep, and generation early-stop.

:class:`ArtifactEstimator` pairs the network with the VAE it was trained with (checked: an
estimator used with another VAE is refused, its previews would be meaningless). :class:`EarlyStopHook`
is a diffusers ``callback_on_step_end``::

    hook = EarlyStopHook(estimator, steps=[5, 10], threshold=3.0)
    pipe(prompt, callback_on_step_end=hook, callback_on_step_end_tensor_inputs=["latents"])
    hook.trajectory   # [{"step", "timestep", "scores", "p_above", "evidence"}, ...]
    hook.stopped_at   # step index where the generation was stopped, or None

After step ``i`` the latents are at the *next* timestep of the schedule (0 after the last step),
which is the timestep the estimator is asked about.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.estimator.dataset import check_vae, encode, load_image, load_vae, pixels_to_model_range, preview
from harness.estimator.model import ArtifactEstimatorNet, load_estimator

log = logging.getLogger(__name__)


class ArtifactEstimator:
    """A trained estimator plus its VAE: ``score_images`` (final pixels) and ``score_latents`` (any step)."""

    def __init__(self, net: ArtifactEstimatorNet, vae, device: str | torch.device = "cpu"):
        check_vae(net.cfg.vae, vae, "estimator")
        self.net = net.to(device).eval()
        self.vae = vae.to(device).eval()
        self.device = torch.device(device)
        self.cfg = net.cfg

    @classmethod
    def load(cls, path: str | Path, *, vae=None, vae_source: str | Path | None = None,
             device: str | torch.device = "cpu") -> ArtifactEstimator:
        """Load from a folder/.safetensors; the VAE is ``vae``, else loaded from ``vae_source``, else from
        the source recorded at training time."""
        net = load_estimator(path)
        if vae is None:
            src = vae_source or net.cfg.vae.get("source")
            if not src:
                raise HarnessError(f"{path}: no VAE given and none recorded in the estimator config")
            vae = load_vae(src)
        return cls(net, vae, device)

    def previews(self, latents: torch.Tensor) -> torch.Tensor:
        return preview(latents, self.cfg.preview, self.cfg.preview_size, self.vae).to(self.device)

    @torch.no_grad()
    def outputs_latents(self, latents: torch.Tensor, timesteps: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=self.device).long().expand(latents.shape[0])
        return self.net(self.previews(latents), t)

    def score_latents(self, latents: torch.Tensor, timesteps: int | torch.Tensor) -> torch.Tensor:
        """Predicted rating for latents in the pipeline's space at ``timesteps`` (0 = clean)."""
        return self.net.predict(self.outputs_latents(latents, timesteps)).cpu()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] or float [0,1] -> latents, resized like the training images (aspect kept)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise HarnessError(f"images: expected [B, 3, H, W], got shape {tuple(images.shape)}")
        x = pixels_to_model_range(images)
        h, w = x.shape[-2:]
        s = self.cfg.image_size / max(h, w)
        nh, nw = max(8, round(h * s)), max(8, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=s < 1).clamp(-1, 1)
        ch, cw = nh // 8 * 8, nw // 8 * 8
        top, left = (nh - ch) // 2, (nw - cw) // 2
        return encode(self.vae, x[..., top:top + ch, left:left + cw].to(self.device))

    def score_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Predicted rating of final images (uint8 [B,3,H,W] or float in [0, 1])."""
        out = [self.score_latents(self.encode_images(images[i:i + batch_size]), 0)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def score_files(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Predicted rating of image files (each loaded with its own aspect)."""
        out = []
        for p in paths:
            z = encode(self.vae, load_image(p, self.cfg.image_size).to(self.device))
            out.append(self.score_latents(z, 0))
        return torch.cat(out) if out else torch.zeros(0)

    def prob_above(self, latents: torch.Tensor, timesteps, threshold: float) -> torch.Tensor:
        return self.net.prob_above(self.outputs_latents(latents, timesteps), threshold).cpu()


class EarlyStopHook:
    """``callback_on_step_end`` that scores the latent preview at chosen steps and can stop the run.

    ``steps``: step indices to score (None = every step). ``threshold``: a predicted rating at or above
    which an image is flagged (None = only record). ``cumulative``: PALBERT-style evidence - each scored
    step gives p_i = P(rating > threshold); the evidence 1 - prod(1 - p_i) accumulates over steps and an
    image is flagged when it reaches ``confidence``. The generation is stopped (``pipe._interrupt``) when
    every image in the batch is flagged and ``stop`` is true (a batch cannot drop single images).
    """

    def __init__(self, estimator: ArtifactEstimator, steps: Sequence[int] | None = None,
                 threshold: float | None = None, *, cumulative: bool = False, confidence: float = 0.9,
                 stop: bool = True):
        if cumulative and threshold is None:
            raise HarnessError("cumulative evidence needs a threshold")
        if not 0 < confidence <= 1:
            raise HarnessError(f"confidence: expected in (0, 1], got {confidence}")
        self.estimator = estimator
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.threshold, self.cumulative, self.confidence, self.stop = threshold, cumulative, confidence, stop
        self.reset()

    def reset(self) -> None:
        self.trajectory: list[dict] = []
        self.stopped_at: int | None = None
        self.flagged: list[bool] | None = None
        self._survive: torch.Tensor | None = None

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        if self.steps is not None and step_index not in self.steps:
            return callback_kwargs
        latents = callback_kwargs.get("latents")
        if latents is None:
            raise HarnessError("EarlyStopHook needs callback_on_step_end_tensor_inputs=['latents']")
        ts = pipe.scheduler.timesteps
        t_now = int(ts[step_index + 1]) if step_index + 1 < len(ts) else 0
        scores = self.estimator.score_latents(latents, t_now)
        entry = {"step": int(step_index), "timestep": t_now, "scores": scores.tolist()}
        if self.threshold is not None:
            p = self.estimator.prob_above(latents, t_now, self.threshold)
            self._survive = (1 - p) if self._survive is None else self._survive * (1 - p)
            evidence = 1 - self._survive
            entry.update(p_above=p.tolist(), evidence=evidence.tolist())
            flags = (evidence >= self.confidence) if self.cumulative else (scores >= self.threshold)
            self.flagged = [bool(a or b) for a, b in zip(flags.tolist(), self.flagged or [False] * len(flags))]
            if self.stop and all(self.flagged) and self.stopped_at is None:
                self.stopped_at = int(step_index)
                pipe._interrupt = True
                log.info("early stop at step %d (t=%d): predicted artifacts %s", step_index, t_now, entry["scores"])
        self.trajectory.append(entry)
        return callback_kwargs
