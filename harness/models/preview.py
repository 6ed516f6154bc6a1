"""The cheap linear latent-to-RGB preview of SD 1.x latents (no VAE decode).

A fixed 4x3 matrix (rows = latent channels, columns = R, G, B) plus a bias maps each latent pixel
to a colour: a blurry 1/8-resolution sketch of what the VAE would decode, good enough to watch a
generation (or score it) at every step for the cost of one matmul.
"""

from __future__ import annotations

import torch

# SD 1.x factors for latents in the pipeline's (scaled) space.
LATENT_RGB_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
LATENT_RGB_BIAS = (0.0, 0.0, 0.0)


def latent_to_rgb(latents: torch.Tensor, factors=LATENT_RGB_FACTORS, bias=LATENT_RGB_BIAS) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, 3, h, w] RGB in [0, 1] (the matrix gives roughly [-1, 1])."""
    if latents.ndim != 4:
        raise ValueError(f"latents: expected [B, C, h, w], got shape {tuple(latents.shape)}")
    f = torch.as_tensor(factors, dtype=torch.float32, device=latents.device)
    if latents.shape[1] != f.shape[0]:
        raise ValueError(f"latents: expected {f.shape[0]} channels for these factors, got {latents.shape[1]}")
    b = torch.as_tensor(bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), f) + b.view(1, 3, 1, 1)
    return ((rgb + 1) / 2).clamp(0, 1)
