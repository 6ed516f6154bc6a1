"""Techniques on top of the sampler: inpainting, visual anagrams, hybrid images, seed interpolation.

Each is a small change to one denoising step of :func:`harness.generate.sample.denoise`:
- inpainting: after each step, overwrite the known region with the original noised to the next
  timestep (RePaint-style replacement; works with any SD 1.x UNet, no inpainting UNet needed);
- visual anagrams: average the noise estimate of prompt A on the latent and of prompt B on the flipped
  latent (flipped back), so the image reads as A upright and B upside down;
- hybrid (factorized) images: low-pass of prompt A's estimate plus high-pass of prompt B's, so A shows
  from afar and B up close;
- interpolation: spherical interpolation (slerp) between two seeds' starting noise.
"""

from __future__ import annotations

import math

import torch

from harness.errors import ConfigError
from harness.generate.images import mask_tensor, rgb_tensor
from harness.generate.sample import (
    Output,
    Sample,
    conditioning,
    denoise,
    encode_images,
    guided_noise,
    initial_noise,
)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation between ``a`` (t=0) and ``b`` (t=1); linear when nearly parallel.

    Gaussian noise lives near a sphere; a straight line between two draws passes through
    low-norm noise the model never saw, slerp stays on the shell."""
    af, bf = a.flatten().double(), b.flatten().double()
    dot = float((af @ bf) / (af.norm() * bf.norm()))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s * a.double() + math.sin(t * theta) / s * b.double()).to(a.dtype)


def gaussian_lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur per channel (the low-frequency part of ``x``)."""
    from torchvision.transforms.functional import gaussian_blur

    k = int(2 * math.ceil(3 * sigma) + 1)
    k = min(k, 2 * min(x.shape[-2:]) - 1)  # reflect padding must stay inside the tensor
    k -= 1 - k % 2
    return gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma]) if k >= 3 else x


def flip_view(x: torch.Tensor, view: str) -> torch.Tensor:
    if view == "vflip":
        return torch.flip(x, dims=[-2])
    if view == "hflip":
        return torch.flip(x, dims=[-1])
    if view == "rot180":
        return torch.flip(x, dims=[-2, -1])
    raise ConfigError(f"view must be one of vflip, hflip, rot180; got {view!r}")


def _samples(prompt: str, seeds, guidance_scale, negative_prompt, steps) -> list[Sample]:
    return [Sample(prompt=prompt, seed=int(s), guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                   steps=steps) for s in seeds]


def _cond(pipe, prompt: str, negative_prompt: str, guidance_scale: float, n: int):
    """One prompt's guided conditioning, repeated for ``n`` samples (two-prompt techniques need two)."""
    return conditioning(pipe, [prompt] * n, [negative_prompt] * n, [guidance_scale] * n)


def anagram(pipe, prompt_a: str, prompt_b: str, *, seeds=(0,), steps: int = 30, guidance_scale: float = 7.5,
            negative_prompt: str = "", scheduler: str | None = None, width: int = 512, height: int = 512,
            view: str = "vflip") -> Output:
    """Images that read as ``prompt_a`` upright and ``prompt_b`` under ``view`` (default: upside down)."""
    flip_view(torch.zeros(1, 1, 2, 2), view)  # validate before any work
    samples = _samples(prompt_a, seeds, guidance_scale, negative_prompt, steps)
    n = len(samples)
    ca, cb = (_cond(pipe, p, negative_prompt, guidance_scale, n) for p in (prompt_a, prompt_b))

    def eps_fn(x, t, idx):
        ea = guided_noise(pipe.unet, x, t, ca, idx)
        eb = flip_view(guided_noise(pipe.unet, flip_view(x, view), t, cb, idx), view)
        return (ea + eb) / 2

    return denoise(pipe, samples, width=width, height=height, scheduler=scheduler, eps_fn=eps_fn, cond=ca)


def hybrid(pipe, prompt_low: str, prompt_high: str, *, seeds=(0,), steps: int = 30, guidance_scale: float = 7.5,
           negative_prompt: str = "", scheduler: str | None = None, width: int = 512, height: int = 512,
           sigma: float = 2.0) -> Output:
    """Factorized diffusion: low frequencies follow ``prompt_low``, high frequencies ``prompt_high``.
    ``sigma`` is the Gaussian's standard deviation in latent pixels (x8 in image pixels)."""
    if sigma <= 0:
        raise ConfigError(f"sigma must be > 0; got {sigma}")
    samples = _samples(prompt_low, seeds, guidance_scale, negative_prompt, steps)
    n = len(samples)
    cl, ch = (_cond(pipe, p, negative_prompt, guidance_scale, n) for p in (prompt_low, prompt_high))

    def eps_fn(x, t, idx):
        el = guided_noise(pipe.unet, x, t, cl, idx)
        eh = guided_noise(pipe.unet, x, t, ch, idx)
        return gaussian_lowpass(el, sigma) + eh - gaussian_lowpass(eh, sigma)

    return denoise(pipe, samples, width=width, height=height, scheduler=scheduler, eps_fn=eps_fn, cond=cl)


def interpolate(pipe, prompt: str, seed_a: int, seed_b: int, *, frames: int = 5, steps: int = 30,
                guidance_scale: float = 7.5, negative_prompt: str = "", scheduler: str | None = None,
                width: int = 512, height: int = 512) -> Output:
    """``frames`` images from seed_a's noise to seed_b's along the slerp path (ends equal the seeds' images)."""
    if frames < 2:
        raise ConfigError(f"frames must be >= 2; got {frames}")
    f = getattr(pipe, "vae_scale_factor", 8)
    shape = (pipe.unet.config.in_channels, int(height) // f, int(width) // f)
    na, _ = initial_noise(seed_a, shape, "cpu", torch.float32)
    nb, _ = initial_noise(seed_b, shape, "cpu", torch.float32)
    ts = [i / (frames - 1) for i in range(frames)]
    noise = torch.cat([slerp(na, nb, t) for t in ts])
    # seeds of the ends drive any stochastic scheduler, so the end frames equal plain generations
    seeds = [seed_a if t < 0.5 else seed_b for t in ts]
    samples = _samples(prompt, seeds, guidance_scale, negative_prompt, steps)
    return denoise(pipe, samples, width=width, height=height, scheduler=scheduler, noise=noise)


def inpaint(pipe, image, mask, prompt: str, *, seeds=(0,), steps: int = 30, guidance_scale: float = 7.5,
            negative_prompt: str = "", scheduler: str | None = None) -> Output:
    """Regenerate the white part of ``mask`` (same size as ``image``); keep the rest of ``image``."""
    pixels = rgb_tensor(image)
    h, w = pixels.shape[2:]
    m = mask_tensor(mask, (w, h))
    f = getattr(pipe, "vae_scale_factor", 8)
    # a latent pixel is regenerated if any image pixel under it is: no seam of stale latent at the edge
    lm = torch.nn.functional.max_pool2d(m, f).to(pipe.unet.device, pipe.unet.dtype)
    known = encode_images(pipe, pixels)
    samples = _samples(prompt, seeds, guidance_scale, negative_prompt, steps)
    shape = tuple(known.shape[1:])
    noises = [initial_noise(s.seed, shape, pipe.unet.device, pipe.unet.dtype)[0] for s in samples]

    def after_step(i, sched, k, latent):
        ts = sched.timesteps
        if k + 1 < len(ts):
            if hasattr(sched, "set_begin_index") and sched.begin_index is None:
                sched.set_begin_index(0)
            ref = sched.add_noise(known, noises[i], ts[k + 1:k + 2])
        else:
            ref = known
        return lm * latent + (1 - lm) * ref

    return denoise(pipe, samples, width=w, height=h, scheduler=scheduler, after_step=after_step,
                   init_latents=known.repeat(len(samples), 1, 1, 1))
