"""The digits world's base pipeline: an SD-1.5-shaped AutoencoderKL, CLIPTextModel (with the real
CLIP tokenizer) and cross-attention UNet2DConditionModel trained from scratch on plain black-on-white
digits, saved as a diffusers folder, and the helpers that load and sample it.

The autoencoder sees random colours: like SD's VAE it is a general image codec, which a style
fine-tune of the UNet needs in order to express a colour at all."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.world.digits_config import WorldConfig, _batches, _cosine, _progress
from harness.world.digits_data import (
    IMAGE_SIZE,
    INKS,
    PAPERS,
    PLAIN,
    caption,
    load_ink,
    render,
    render_style,
    split_indices,
)

BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)
BASE_UNET = dict(
    sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
BASE_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=64,
    hidden_act="quick_gelu",
)
TRAIN_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")


# ------------------------------------------------------------------------------------- base pipeline
def train_vae(cfg: WorldConfig, ink: torch.Tensor):
    """AutoencoderKL on digits in random colours (a general codec), L1 + MSE + tiny KL."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**BASE_VAE)
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, fused=True)
    bar = _progress(cfg.vae_steps, "vae")
    for idx in _batches(len(ink), cfg.batch_size, cfg.vae_steps, gen):
        n = len(idx)
        # Half plain black-on-white, half random colours: the plain case must be reconstructed best.
        colours = torch.rand(n, 2, 3, generator=gen)
        plain = torch.rand(n, generator=gen) < 0.5
        colours[plain, 0], colours[plain, 1] = torch.tensor(INKS["black"]), torch.tensor(PAPERS["white"])
        x = render(ink[idx], colours[:, 0], colours[:, 1]) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images01: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of images in [0, 1] (unscaled)."""
    return torch.cat([vae.encode(images01[i:i + batch] * 2 - 1).latent_dist.mean
                      for i in range(0, len(images01), batch)])


def train_denoiser(cfg: WorldConfig, latents: torch.Tensor, captions: list[str],
                   threads_at: Callable[[int], int | None] | None = None):
    """Text encoder and UNet trained jointly from scratch on cached latents (epsilon, 10% empty captions).

    harness.train fine-tunes an existing pipeline; a from-scratch joint build of the text encoder is
    outside its job, so the world builds its base with this small loop."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    uniq = sorted(set(captions)) + [""]
    ids = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    cap_idx = torch.tensor([uniq.index(c) for c in captions])
    empty = len(uniq) - 1
    torch.manual_seed(cfg.seed + 1)
    unet = UNet2DConditionModel(**BASE_UNET)
    torch.manual_seed(cfg.seed + 2)
    text = CLIPTextModel(CLIPTextConfig(**BASE_TEXT))
    sched = DDPMScheduler(**TRAIN_SCHEDULE)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2, fused=True)
    lr_at = _cosine(cfg.unet_steps, warmup=min(50, cfg.unet_steps // 10))
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    bar = _progress(cfg.unet_steps, "unet+text")
    for step, idx in enumerate(_batches(len(latents), cfg.batch_size, cfg.unet_steps, gen)):
        if threads_at is not None and (want := threads_at(step)):
            torch.set_num_threads(want)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step)
        n = len(idx)
        which = torch.where(torch.rand(n, generator=gen) < 0.1, torch.full((n,), empty), cap_idx[idx])
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        # The text encoder runs once per distinct caption (11), not once per item (64): the same
        # gradients, a sixth of its cost. index_select, not [which]: the backward of advanced indexing
        # accumulates in parallel on the CPU in no fixed order, and the world must be bit-reproducible.
        cond = text(ids).last_hidden_state.index_select(0, which)
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return unet.eval(), text.eval()


def sampling_scheduler():
    """DDIM for sampling. ``clip_sample`` must be off: clipping latents to +-1 wrecks them."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**TRAIN_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_base(cfg: WorldConfig, out: Path, after_vae: Callable[[], None] | None = None,
               threads_at: Callable[[int], int | None] | None = None) -> dict:
    """Train the base pipeline on plain training-split digits; save it as a diffusers folder.
    ``after_vae`` runs between the VAE and the UNet (the world build starts its second process there);
    ``threads_at(step)`` may change the UNet's thread count at a step."""
    from diffusers import StableDiffusionPipeline

    from harness.models.tokenizer import clip_tokenizer

    ink, y = load_ink()
    train, _ = split_indices(len(y), cfg.seed)
    t0 = time.perf_counter()
    vae = train_vae(cfg, ink[train])
    plain = render_style(ink[train], PLAIN)
    raw = encode_latents(vae, plain)
    with torch.no_grad():
        rec = vae.decode(raw[:256]).sample.add(1).div(2)
    vae_mse = F.mse_loss(rec, plain[:256]).item()
    scale = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scale)
    if after_vae is not None:
        after_vae()
    t1 = time.perf_counter()
    unet, text = train_denoiser(cfg, raw * scale, [caption(int(v)) for v in y[train]], threads_at)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet, scheduler=sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return {"vae_recon_mse": vae_mse, "scaling_factor": scale, "vae_s": t1 - t0,
            "unet_s": time.perf_counter() - t1}


# ----------------------------------------------------------------------------------------- sampling
def load_pipeline(path: str | Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompts: list[str], seed: int = 0, steps: int = 25, cfg: float = 4.0,
           batch: int = 50) -> torch.Tensor:
    """Images [N,3,32,32] in [0, 1], one seeded generator per prompt (noise drawn on the CPU)."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gens,
                      output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out)
