"""The diffusion training objective as small pure functions (each tested on its own).

``alphas_cumprod`` is the base model's DDPM schedule (ᾱ_t); everything here is the math of
Ho et al. (epsilon), Salimans & Ho (v-prediction), Hang et al. (min-SNR-γ) and the noise-offset trick.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    a = alphas_cumprod.to(t.device)[t].float()
    return a.reshape(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε."""
    a = _gather(alphas_cumprod, t, x0.ndim)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0."""
    a = _gather(alphas_cumprod, t, x0.ndim)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
           alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    raise ValueError(f"prediction_type = {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t)."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ, expressed for the model's prediction target.

    The paper weights the x_0 loss by min(SNR, γ); an ε-loss equals the x_0 loss times SNR, and a v-loss
    the x_0 loss times SNR+1, so the weights divide by those."""
    if gamma <= 0:
        raise ValueError(f"gamma = {gamma}: expected a positive number")
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"prediction_type = {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def offset_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator | None = None,
                 device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise plus ``offset`` times a per-(sample, channel) constant, so the model can learn
    to shift an image's mean brightness (Guttenberg, 'Diffusion with offset noise')."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], *([1] * (len(shape) - 2))),
                                             generator=generator, device=device, dtype=dtype)
    return noise


def weighted_mse(pred: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, each sample's mean optionally scaled by its weight (computed in fp32)."""
    per_sample = F.mse_loss(pred.float(), tgt.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()
