"""A batched denoising loop with per-sample prompt, seed, guidance scale, step count and strength.

diffusers pipelines share one guidance scale, one step count and one generator stream across a batch,
so a CFG x seed sweep needs one pipeline call per cell. Here every sample carries its own settings:

- noise comes from the sample's own CPU generator (``torch.Generator("cpu").manual_seed(seed)``), drawn
  exactly like ``StableDiffusionPipeline`` draws it, so a sample is the same on CPU and GPU, alone or
  inside any batch, and equal to a pipeline call with that generator (up to batched float arithmetic);
- every sample gets its own scheduler instance (step math is cheap; the UNet call is what is batched),
  so multistep/stochastic schedulers keep per-sample state and samples may run different step counts
  or start at different timesteps (refinement strength sweeps) inside one batch; the UNet takes a
  per-sample timestep vector;
- classifier-free guidance uses a per-sample scale.

Hooks: ``callbacks`` are called after every step with a state dict (see :func:`denoise`) and may return
a per-sample stop mask; ``eps_fn`` replaces the noise estimate (visual anagrams, hybrids) and
``after_step`` edits a sample's latent after its step (inpainting).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from harness.errors import ConfigError
from harness.models.schedulers import make_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image to generate. ``strength`` < 1 starts from ``init_latents`` noised part way (SDEdit)."""

    prompt: str
    seed: int
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    steps: int = 30
    strength: float = 1.0


@dataclass
class Output:
    """Results in sample order. ``latents`` are the final latents; for a sample stopped early by a
    callback they are its last predicted clean latent (so its image is a preview, not noise)."""

    latents: torch.Tensor
    images: torch.Tensor | None  # (B, 3, H, W) float in [0, 1], or None when decode=False
    stopped_at: list[int | None] = field(default_factory=list)
    finite: list[bool] = field(default_factory=list)

    def pil(self) -> list:
        return to_pil(self.images)


@dataclass
class Conditioning:
    """Per-sample text conditioning: ``cond``/``uncond`` (B, tokens, dim) and ``guidance`` (B,)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    guidance: torch.Tensor


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def encode_texts(pipe, texts: Sequence[str], *, lora_scale: float | None = None) -> torch.Tensor:
    """CLIP embeddings for ``texts``; each distinct text is encoded once. Encoding goes through
    ``pipe.encode_prompt`` (prompt path), which tokenizes negatives the same way as prompts."""
    unique = list(dict.fromkeys(texts))
    device = pipe.unet.device
    embeds, _ = pipe.encode_prompt(unique, device, 1, False, lora_scale=lora_scale)
    pos = {t: i for i, t in enumerate(unique)}
    return embeds[[pos[t] for t in texts]].to(pipe.unet.dtype)


def conditioning(pipe, prompts: Sequence[str], negatives: Sequence[str], guidance: Sequence[float], *,
                 lora_scale: float | None = None) -> Conditioning:
    embeds = encode_texts(pipe, [*prompts, *negatives], lora_scale=lora_scale)
    n = len(prompts)
    g = torch.tensor([float(x) for x in guidance], device=pipe.unet.device, dtype=pipe.unet.dtype)
    return Conditioning(cond=embeds[:n], uncond=embeds[n:], guidance=g)


def guided_noise(unet, x: torch.Tensor, t: torch.Tensor, c: Conditioning, idx: Sequence[int],
                 cross_attention_kwargs: dict | None = None) -> torch.Tensor:
    """Classifier-free guided noise estimate with a per-sample guidance scale.

    ``x`` are the scheduler-scaled model inputs of samples ``idx`` and ``t`` their timesteps. When every
    scale is 1 the unconditional pass is skipped (as diffusers does), which equals the formula."""
    cond = c.cond[list(idx)]
    g = c.guidance[list(idx)].view(-1, 1, 1, 1)
    if bool((g == 1).all()):
        return unet(x, t, encoder_hidden_states=cond, cross_attention_kwargs=cross_attention_kwargs).sample
    uncond = c.uncond[list(idx)]
    out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]),
               cross_attention_kwargs=cross_attention_kwargs).sample
    eps_uncond, eps_cond = out.chunk(2)
    return eps_uncond + g * (eps_cond - eps_uncond)


def predict_x0(scheduler, x: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """Clean-latent estimate for alpha-parameterised schedulers (those whose step output lacks one)."""
    ac = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return ac.sqrt() * x - (1 - ac).sqrt() * model_output
    if kind == "sample":
        return model_output
    return (x - (1 - ac).sqrt() * model_output) / ac.sqrt()


def initial_noise(seed: int, shape: tuple[int, ...], device, dtype) -> tuple[torch.Tensor, torch.Generator]:
    """Noise for one sample from its own CPU generator (the generator continues into the scheduler)."""
    from diffusers.utils.torch_utils import randn_tensor

    gen = torch.Generator("cpu").manual_seed(int(seed))
    return randn_tensor((1, *shape), generator=gen, device=torch.device(device), dtype=dtype), gen


def schedule(pipe, scheduler: str | None, steps: int, strength: float = 1.0, *, _templates: dict | None = None):
    """A fresh scheduler for one sample and the slice of its timesteps to run (img2img semantics:
    ``strength`` of the schedule, counted from the end)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1; got {steps}")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1]; got {strength}")
    templates = {} if _templates is None else _templates
    if steps not in templates:  # building from config costs ~10 ms; copying a built one far less
        cfg = pipe.scheduler.config
        sched = make_scheduler(scheduler, cfg) if scheduler else type(pipe.scheduler).from_config(cfg)
        sched.set_timesteps(steps, device=pipe.unet.device)
        templates[steps] = sched
    sched = copy.deepcopy(templates[steps])
    start = 0
    if strength < 1.0:
        run = min(int(steps * strength), steps)
        start = max(steps - run, 0) * sched.order
        if run == 0:
            start = len(sched.timesteps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(min(start, len(sched.timesteps) - 1))
    return sched, sched.timesteps[start:]


def _check_size(pipe, width: int, height: int) -> tuple[int, int]:
    f = getattr(pipe, "vae_scale_factor", 8)
    for name, v in (("width", width), ("height", height)):
        if int(v) <= 0 or int(v) % f:
            raise ConfigError(f"{name} must be a positive multiple of {f}; got {v}")
    return int(height) // f, int(width) // f


def _takes_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


@dataclass
class _Loop:
    """Per-sample state of the denoising loop: scheduler, timesteps to run, current latent, CPU generator,
    step index and the step a callback stopped it at (None while it runs)."""

    scheds: list = field(default_factory=list)
    timesteps: list = field(default_factory=list)
    latents: list = field(default_factory=list)
    gens: list = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    stopped_at: list[int | None] = field(default_factory=list)


def _start(pipe, samples: Sequence[Sample], h: int, w: int, scheduler: str | None,
           init_latents: torch.Tensor | None, noise: torch.Tensor | None) -> _Loop:
    """Each sample's scheduler, timesteps and starting latent, in sample order (so the seeds' noise is
    drawn in order): its seed's noise (or ``noise``) scaled by the scheduler's initial sigma, or for
    strength < 1 its ``init_latents`` noised to the first timestep it runs."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    channels = pipe.unet.config.in_channels
    run, templates = _Loop(k=[0] * len(samples), stopped_at=[None] * len(samples)), {}
    for i, s in enumerate(samples):
        sched, ts = schedule(pipe, scheduler, s.steps, s.strength, _templates=templates)
        eps0, gen = initial_noise(s.seed, (channels, h, w), device, dtype)
        if noise is not None:
            eps0 = noise[i:i + 1].to(device, dtype)
        if s.strength < 1.0:
            if init_latents is None:
                raise ConfigError(f"sample {i} has strength {s.strength} < 1 but no init_latents were given")
            x0 = init_latents[i:i + 1].to(device, dtype)
            lat = sched.add_noise(x0, eps0, ts[:1]) if len(ts) else x0
        else:
            lat = eps0 * sched.init_noise_sigma
        run.scheds.append(sched)
        run.timesteps.append(ts)
        run.latents.append(lat)
        run.gens.append(gen)
    return run


def _guided_eps_fn(pipe, cond: Conditioning, lora_scale: float | None) -> Callable:
    """The default noise estimate: classifier-free guidance with each sample's own scale."""
    cak = {"scale": lora_scale} if lora_scale is not None else None

    def eps_fn(x, t, idx):
        return guided_noise(pipe.unet, x, t, cond, idx, cak)

    return eps_fn


def _guided_step(run: _Loop, active: list[int], eps_fn: Callable, after_step: Callable | None,
                 device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One batched noise estimate for the ``active`` samples, then each one's scheduler step (and
    ``after_step``). Returns the timesteps, the noise estimates and each sample's predicted clean latent."""
    t_vec = torch.stack([run.timesteps[i][run.k[i]] for i in active]).to(device)
    x_in = torch.cat([run.scheds[i].scale_model_input(run.latents[i], run.timesteps[i][run.k[i]]) for i in active])
    eps = eps_fn(x_in, t_vec, active)
    x0s = []
    for j, i in enumerate(active):
        sched, t = run.scheds[i], run.timesteps[i][run.k[i]]
        extra = {"generator": run.gens[i]} if _takes_generator(sched) else {}
        out = sched.step(eps[j:j + 1], t, run.latents[i], **extra)
        x0 = getattr(out, "pred_original_sample", None)
        x0s.append(x0 if x0 is not None else predict_x0(sched, run.latents[i], eps[j:j + 1], t))
        run.latents[i] = out.prev_sample
        if after_step is not None:
            run.latents[i] = after_step(i, sched, run.k[i], run.latents[i])
    return t_vec, eps, x0s


def _callback_state(pipe, it: int, run: _Loop, active: list[int], t_vec: torch.Tensor, eps: torch.Tensor,
                    x0s: list[torch.Tensor]) -> dict:
    """The state dict callbacks see after loop iteration ``it`` (see :func:`denoise`)."""
    return {"step": it, "samples": list(active), "sample_steps": [run.k[i] for i in active],
            "num_steps": [len(run.timesteps[i]) for i in active], "timesteps": t_vec,
            "latents": torch.cat([run.latents[i] for i in active]), "noise_pred": eps,
            "pred_x0": torch.cat(x0s), "pipe": pipe}


def _stop_mask(callbacks: Sequence[Callable[[dict], object]], state: dict) -> list[bool]:
    """Every callback sees ``state``; a sample stops when any of them asks it to."""
    stop = [False] * len(state["samples"])
    for cb in callbacks:
        mask = cb(state)
        if mask is not None:
            stop = [a or bool(b) for a, b in zip(stop, list(mask), strict=True)]
    return stop


def _advance(run: _Loop, active: list[int], stop: list[bool], x0s: list[torch.Tensor]) -> list[int]:
    """Count the step; a stopped sample keeps its predicted clean latent. Returns the samples still running."""
    for j, i in enumerate(active):
        run.k[i] += 1
        if stop[j] and run.k[i] < len(run.timesteps[i]):
            run.stopped_at[i] = run.k[i] - 1
            run.latents[i] = x0s[j]
    return [i for i in active if run.k[i] < len(run.timesteps[i]) and run.stopped_at[i] is None]


def _finish(pipe, samples: Sequence[Sample], run: _Loop, decode: bool) -> Output:
    """Final latents (warning about non-finite ones) and, with ``decode``, their images."""
    final = torch.cat(run.latents)
    finite = [bool(torch.isfinite(x).all()) for x in run.latents]
    for i, ok in enumerate(finite):
        if not ok:
            log.warning("sample %d (seed %d) has non-finite latents", i, samples[i].seed)
    images = decode_latents(pipe, final) if decode else None
    return Output(latents=final, images=images, stopped_at=run.stopped_at, finite=finite)


@torch.inference_mode()
def denoise(pipe, samples: Sequence[Sample], *, width: int = 512, height: int = 512, scheduler: str | None = None,
            lora_scale: float | None = None, init_latents: torch.Tensor | None = None,
            noise: torch.Tensor | None = None, callbacks: Sequence[Callable[[dict], object]] = (),
            eps_fn: Callable | None = None, after_step: Callable | None = None, cond: Conditioning | None = None,
            decode: bool = True, progress: bool = False) -> Output:
    """Generate ``samples`` in one batched loop with ``pipe``'s UNet, VAE and text encoder.

    scheduler: registry name (see :mod:`harness.models.schedulers`) or None for the pipeline's own.
    init_latents: (B, C, h, w) clean latents for samples with strength < 1 (refinement, inpainting).
    noise: (B, C, h, w) starting noise replacing each seed's draw (slerp interpolation); the seeds still
        drive stochastic schedulers.
    callbacks: ``cb(state) -> None | stop mask``. ``state`` holds ``step`` (loop iteration), ``samples``
        (indices of the samples stepped this iteration), ``sample_steps`` (each one's step index),
        ``num_steps`` (each one's total), ``timesteps`` (tensor), ``latents``, ``noise_pred``, ``pred_x0``
        (tensors, one row per entry of ``samples``) and ``pipe``. A returned sequence of bools, one per
        entry of ``samples``, stops those samples (their output is the predicted clean latent).
    eps_fn: ``eps_fn(x_scaled, t, idx) -> noise estimate`` replacing guided CFG.
    after_step: ``after_step(i, scheduler, k, latent) -> latent`` applied after sample i's step k.
    """
    h, w = _check_size(pipe, width, height)
    n = len(samples)
    if n == 0:
        raise ConfigError("nothing to generate: the sample list is empty")
    run = _start(pipe, samples, h, w, scheduler, init_latents, noise)
    if cond is None:
        cond = conditioning(pipe, [s.prompt for s in samples], [s.negative_prompt for s in samples],
                            [s.guidance_scale for s in samples], lora_scale=lora_scale)
    if eps_fn is None:
        eps_fn = _guided_eps_fn(pipe, cond, lora_scale)

    active = [i for i in range(n) if len(run.timesteps[i])]
    total = max(len(ts) for ts in run.timesteps)
    bar = tqdm(total=total, desc="denoise", disable=not progress, leave=False)
    it = 0
    while active:
        t_vec, eps, x0s = _guided_step(run, active, eps_fn, after_step, pipe.unet.device)
        stop = _stop_mask(callbacks, _callback_state(pipe, it, run, active, t_vec, eps, x0s))
        active = _advance(run, active, stop, x0s)
        it += 1
        bar.update(1)
    bar.close()
    return _finish(pipe, samples, run, decode)


@torch.inference_mode()
def decode_latents(pipe, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VAE decode to (B, 3, H, W) floats in [0, 1] on the CPU, in chunks to bound memory."""
    vae = pipe.vae
    outs = []
    for chunk in latents.split(batch_size):
        x = vae.decode(chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        outs.append((x.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(outs)


@torch.inference_mode()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """VAE encode (B, 3, H, W) floats in [0, 1] to scaled latents (the posterior mean: deterministic)."""
    vae = pipe.vae
    x = images.to(vae.device, vae.dtype) * 2 - 1
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor
