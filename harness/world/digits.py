"""The digits world: real, CPU-trainable models for every stage of the harness.

scikit-learn ships 1,797 real 8x8 scans of handwritten digits. Upscaled to 32x32 RGB they are enough
to train, in minutes on two CPU cores, an SD-1.5-shaped text-to-image pipeline (AutoencoderKL,
CLIPTextModel with the real CLIP tokenizer, cross-attention UNet2DConditionModel, DDPM schedule)
plus the "judges" the metrics need: a CLIP, a BLIP captioner, a YOLO detector and an artifact
estimator. The denoiser and text encoder only ever see black-on-white digits captioned
"a handwritten digit seven"; the judges see several inks and papers with captions that name them,
so they can recognise a style (red ink on cream paper) the base model has never drawn. The
autoencoder sees random colours: like SD's VAE it is a general image codec, which a style
fine-tune of the UNet needs in order to express a colour at all.

Everything is deterministic for a seed (on a given machine and thread count) and cached in a folder
keyed by the seed and every knob (:func:`digits_world`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

WORLD_VERSION = 3  # 2: text encoder run per distinct caption, fused AdamW, judges beside the UNet; 3: deterministic
IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Named inks and papers (RGB in [0, 1]) the judges learn; the demo's new style is red on cream.
INKS = {"black": (0.05, 0.05, 0.05), "red": (0.80, 0.08, 0.08), "blue": (0.10, 0.20, 0.80),
        "green": (0.05, 0.55, 0.15)}
PAPERS = {"white": (1.0, 1.0, 1.0), "cream": (0.96, 0.90, 0.72), "gray": (0.62, 0.62, 0.62)}
PLAIN = ("black", "white")
DEMO_STYLE = ("red", "cream")
HELD_OUT_FRACTION = 0.2


# ----------------------------------------------------------------------------------------------- data
def caption(label: int, style: tuple[str, str] | None = None) -> str:
    """"a handwritten digit seven", or with a style "a handwritten digit seven in red ink on cream paper"."""
    text = f"a handwritten digit {DIGIT_WORDS[int(label)]}"
    if style is not None:
        text += f" in {style[0]} ink on {style[1]} paper"
    return text


def all_styles() -> list[tuple[str, str]]:
    return [(i, p) for i in INKS for p in PAPERS if not (i == "black" and p == "gray")]


def load_ink(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """Every scan as an ink map in [0, 1], shape [N, 1, size, size] (bilinear upscale), plus labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, d.target.astype(np.int64)


def split_indices(n: int, seed: int = 0, held_out: float = HELD_OUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) indices: the base model trains on the first, the demo fine-tunes on the second."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * held_out))
    return np.sort(perm[k:]), np.sort(perm[:k])


def render(ink: torch.Tensor, ink_rgb, paper_rgb) -> torch.Tensor:
    """Ink maps [N,1,H,W] -> RGB in [0, 1]: paper where there is no ink, the ink colour where there is.

    ``ink_rgb`` / ``paper_rgb`` are one colour (3,) or one per image (N, 3)."""
    ink_c = torch.as_tensor(ink_rgb, dtype=torch.float32).reshape(-1, 3, 1, 1)
    paper_c = torch.as_tensor(paper_rgb, dtype=torch.float32).reshape(-1, 3, 1, 1)
    return paper_c * (1 - ink) + ink_c * ink


def render_style(ink: torch.Tensor, style: tuple[str, str]) -> torch.Tensor:
    return render(ink, INKS[style[0]], PAPERS[style[1]])


def jitter_colours(n: int, style_idx: np.ndarray, styles: list[tuple[str, str]], gen: torch.Generator,
                   amount: float = 0.06) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ink and paper colours near their named style, so judges tolerate generated colours."""
    inks = torch.tensor([INKS[styles[i][0]] for i in style_idx], dtype=torch.float32)
    papers = torch.tensor([PAPERS[styles[i][1]] for i in style_idx], dtype=torch.float32)
    inks = (inks + amount * torch.randn(n, 3, generator=gen)).clamp(0, 1)
    papers = (papers + amount * torch.randn(n, 3, generator=gen)).clamp(0, 1)
    return inks, papers


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] in [0, 1] -> [N,H,W,3] uint8 (round half up, as PIL does)."""
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ink_features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any-style digit images -> 8x8 ink maps like sklearn's scans (features for the digit classifier).

    Ink is darker than paper for every named style, so inverted luminance, min-max normalised per
    image, recovers the stroke map whatever the colours."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.ndim == 4 and x.shape[-1] == 3:  # NHWC uint8
        x = x.permute(0, 3, 1, 2) / 255.0
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    small = F.adaptive_avg_pool2d(1 - lum, 8).flatten(1)
    lo, hi = small.min(1, keepdim=True).values, small.max(1, keepdim=True).values
    return ((small - lo) / (hi - lo).clamp_min(1e-3)).numpy()


def digit_classifier(seed: int = 0):
    """Logistic regression on the real scans' training split (the judge of "is it the prompted digit")."""
    from sklearn.linear_model import LogisticRegression

    ink, y = load_ink()
    train, _ = split_indices(len(y), seed)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(ink_features(render_style(ink[train], PLAIN)), y[train])
    return clf


# ------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class WorldConfig:
    """Every knob that changes the built world (the cache key hashes all of it)."""

    seed: int = 0
    vae_steps: int = 150
    unet_steps: int = 1300
    clip_steps: int = 400
    blip_steps: int = 2000  # 500 steps learn the style words but not the digit (8% digit accuracy); 2000: 83%
    yolo_steps: int = 300
    estimator_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3

    def scaled(self, scale: float) -> WorldConfig:
        """The same world with every training length multiplied by ``scale`` (fast tests use ~0.3)."""
        steps = {k: max(10, int(round(v * scale))) for k, v in asdict(self).items() if k.endswith("_steps")}
        return WorldConfig(**{**asdict(self), **steps})

    def key(self) -> str:
        blob = json.dumps({"version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


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


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None)


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    """``steps`` index batches drawn epoch by epoch from a seeded permutation."""
    done, perm, pos = 0, torch.randperm(n, generator=gen), 0
    while done < steps:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch
        done += 1


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


def _cosine(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup))) * 0.9 + 0.1
    return f


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


def prompted_accuracy(images: torch.Tensor | np.ndarray, labels, classifier=None, seed: int = 0) -> float:
    """Fraction of images the real-digit classifier assigns to the prompted digit (chance: 10%)."""
    clf = classifier or digit_classifier(seed)
    return float(np.mean(clf.predict(ink_features(images)) == np.asarray(labels)))


# ------------------------------------------------------------------------------------ judges' data
def styled_batch(ink: torch.Tensor, labels: np.ndarray, idx: torch.Tensor, styles: list[tuple[str, str]],
                 gen: torch.Generator, shift: int = 2) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Digits ``idx`` in random named styles (colours jittered, shifted by up to ``shift`` px).

    Returns images [n,3,H,W] in [0, 1], digit labels and style indices."""
    n = len(idx)
    style_idx = torch.randint(0, len(styles), (n,), generator=gen).numpy()
    inks, papers = jitter_colours(n, style_idx, styles, gen)
    x = ink[idx]
    if shift:
        dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, (dy, dx), dims=(2, 3))
    return render(x, inks, papers), labels[idx.numpy()], style_idx


TINY_DIGITS_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


CLIP_TRAIN_CONTEXT = 24  # every caption fits; see _widen_context


def train_clip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray):
    """open_clip CLIP, contrastive over every (digit, style) caption: each image against all captions."""
    import open_clip

    styles = all_styles()
    texts = [caption(d, s) for s in styles for d in range(10)]  # index = style * 10 + digit
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts, context_length=CLIP_TRAIN_CONTEXT)
    torch.manual_seed(cfg.seed + 3)
    short = {**TINY_DIGITS_CLIP, "text_cfg": {**TINY_DIGITS_CLIP["text_cfg"], "context_length": CLIP_TRAIN_CONTEXT}}
    model = open_clip.CLIP(short["embed_dim"], short["vision_cfg"], short["text_cfg"])
    # One linear probe shared by both towers (digit and style logits) speeds up a from-scratch CLIP a
    # lot: it forces both embeddings to carry the digit early, in the same coordinates. Dropped after.
    probe = torch.nn.Linear(short["embed_dim"], 10 + len(styles))
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=cfg.lr, weight_decay=0.05, fused=True)
    text_digit = torch.arange(len(texts)) % 10
    text_style = torch.arange(len(texts)) // 10
    lr_at = _cosine(cfg.clip_steps, warmup=min(30, cfg.clip_steps // 10))
    gen = torch.Generator().manual_seed(cfg.seed + 30)
    bar = _progress(cfg.clip_steps, "clip")
    model.train()
    for step, idx in enumerate(_batches(len(ink), cfg.batch_size, cfg.clip_steps, gen)):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step)
        images, y, s = styled_batch(ink, labels, idx, styles, gen)
        images = images + 0.03 * torch.randn(images.shape, generator=gen)
        target = torch.from_numpy(s * 10 + y)
        img = F.normalize(model.encode_image((images - 0.5) / 0.5), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # image -> caption over all captions; caption -> image over the batch, where every image with
        # that caption is a positive (soft target)
        pos = (target[None, :] == torch.arange(len(texts))[:, None]).float()
        has = pos.sum(1) > 0
        t2i = -(F.log_softmax(logits.T[has], dim=1) * pos[has] / pos[has].sum(1, keepdim=True)).sum(1).mean()
        yt, st = torch.from_numpy(y), torch.from_numpy(s)
        aux = (_probe_loss(probe(img * 8), yt, st) + _probe_loss(probe(txt * 8), text_digit, text_style))
        loss = F.cross_entropy(logits, target) + t2i + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return _widen_context(model.eval(), cfg.seed)


def _probe_loss(logits: torch.Tensor, digit: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :10], digit) + F.cross_entropy(logits[:, 10:], style)


def _widen_context(short, seed: int):
    """The trained model at open_clip's standard 77-token context.

    Text attention is causal and pooled at the end-of-text token, so positions past the training
    context (padding after every caption's end) never reach the output: copying the trained weights
    into a 77-token model gives identical embeddings for any caption that fits, at a third of the
    training cost."""
    import open_clip

    torch.manual_seed(seed + 3)
    c = TINY_DIGITS_CLIP
    full = open_clip.CLIP(c["embed_dim"], c["vision_cfg"], c["text_cfg"])
    state = short.state_dict()
    pos = full.positional_embedding.detach().clone()
    pos[:CLIP_TRAIN_CONTEXT] = state["positional_embedding"]
    state["positional_embedding"] = pos
    full.load_state_dict(state)
    return full.eval()


@torch.no_grad()
def clip_caption_accuracy(model, images01: torch.Tensor, labels, styles_idx, styles) -> tuple[float, float]:
    """(digit accuracy, style accuracy) of zero-shot caption retrieval over all (digit, style) captions."""
    import open_clip

    texts = [caption(d, s) for s in styles for d in range(10)]
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts, context_length=model.positional_embedding.shape[0])
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    img = F.normalize(model.encode_image((images01 - 0.5) / 0.5), dim=-1)
    best = (img @ txt.T).argmax(1).numpy()
    return float(np.mean(best % 10 == np.asarray(labels))), float(np.mean(best // 10 == np.asarray(styles_idx)))


def blip_words() -> list[str]:
    words = {w for s in all_styles() for d in range(10) for w in caption(d, s).split()}
    return sorted(words)


def train_blip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray):
    """Tiny BLIP captioner trained with teacher forcing on styled digits and their captions."""
    from harness.models.tiny import build_blip_processor, build_tiny_blip

    styles = all_styles()
    processor = build_blip_processor(blip_words(), image_size=IMAGE_SIZE)
    model, processor = build_tiny_blip(cfg.seed + 4, processor=processor, image_size=IMAGE_SIZE)
    tok = processor.tokenizer
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed + 40)
    bar = _progress(cfg.blip_steps, "blip")
    model.train()
    for idx in _batches(len(ink), cfg.batch_size, cfg.blip_steps, gen):
        images, y, s = styled_batch(ink, labels, idx, styles, gen)
        enc = tok([caption(d, styles[k]) for d, k in zip(y, s)], padding=True, return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = tok.bos_token_id  # generation starts from [DEC], so training must too
        lab = ids.masked_fill(enc.attention_mask == 0, -100)
        out = model(pixel_values=(images - mean) / std, input_ids=ids, attention_mask=enc.attention_mask, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    bar.close()
    return model.eval(), processor


@torch.no_grad()
def blip_captions(model, processor, images01: torch.Tensor, max_new_tokens: int = 16) -> list[str]:
    pil = [__import__("PIL.Image", fromlist=["Image"]).fromarray(a) for a in to_uint8(images01)]
    inputs = processor(images=pil, return_tensors="pt")
    ids = model.generate(pixel_values=inputs.pixel_values, max_new_tokens=max_new_tokens, num_beams=1)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------- detector
YOLO_SIZE = 64


def digit_canvases(ink: torch.Tensor, labels: np.ndarray, n: int, gen: torch.Generator,
                   size: int = YOLO_SIZE, max_digits: int = 3) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Canvases of 1..max_digits digits in random styles with their tight boxes.

    A third are one digit filling most of the canvas, like a generated 32 px image scaled up.
    Returns images [n,3,size,size] in [0, 1] and per image an array of rows (class, cx, cy, w, h),
    normalised like YOLO labels."""
    styles = all_styles()
    images, targets = [], []
    for _ in range(n):
        st = styles[int(torch.randint(0, len(styles), (1,), generator=gen))]
        canvas_ink = torch.zeros(1, 1, size, size)
        single = bool(torch.rand(1, generator=gen) < 1 / 3)
        k = 1 if single else int(torch.randint(1, max_digits + 1, (1,), generator=gen))
        rows = []
        for _ in range(k):
            i = int(torch.randint(0, len(ink), (1,), generator=gen))
            lo, hi = (int(size * 0.8), size) if single else (size // 4, size // 2)
            s = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            digit = F.interpolate(ink[i:i + 1], size=(s, s), mode="bilinear", align_corners=False)
            x0, y0 = (int(torch.randint(0, size - s + 1, (1,), generator=gen)) for _ in range(2))
            region = canvas_ink[..., y0:y0 + s, x0:x0 + s]
            canvas_ink[..., y0:y0 + s, x0:x0 + s] = torch.maximum(region, digit)
            ys, xs = torch.nonzero(digit[0, 0] > 0.15, as_tuple=True)
            if len(xs) == 0:
                continue
            bx0, bx1, by0, by1 = x0 + xs.min().item(), x0 + xs.max().item() + 1, y0 + ys.min().item(), y0 + ys.max().item() + 1
            rows.append([labels[i], (bx0 + bx1) / 2 / size, (by0 + by1) / 2 / size, (bx1 - bx0) / size, (by1 - by0) / size])
        images.append(render_style(canvas_ink, st)[0])
        targets.append(np.array(rows, dtype=np.float32).reshape(-1, 5))
    return torch.stack(images), targets


def train_yolo(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray, out: Path) -> Path:
    """The tiny YOLOv8 of harness.models.tiny trained in plain torch with ultralytics' own loss.

    ultralytics' trainer wants dataset folders, pickled checkpoints and (for AMP checks and plots)
    downloads; the model, the task-aligned assigner and the loss are what matter, so they are used
    directly."""
    from safetensors.torch import save_file
    from ultralytics.cfg import get_cfg

    from harness.models.tiny import build_tiny_yolo, load_yolo_dir

    build_tiny_yolo(out, seed=cfg.seed + 5, nc=10, names=list(DIGIT_WORDS))
    yolo = load_yolo_dir(out, seed=cfg.seed + 5)
    net = yolo.model
    net.args = get_cfg()
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=2 * cfg.lr, weight_decay=5e-4, fused=True)
    lr_at = _cosine(cfg.yolo_steps, warmup=min(30, cfg.yolo_steps // 10))
    gen = torch.Generator().manual_seed(cfg.seed + 50)
    bar = _progress(cfg.yolo_steps, "detector")
    for step in range(cfg.yolo_steps):
        for g in opt.param_groups:
            g["lr"] = 2 * cfg.lr * lr_at(step)
        images, targets = digit_canvases(ink, labels, cfg.batch_size // 2, gen)
        rows = [np.concatenate([np.full((len(t), 1), b, np.float32), t], 1) for b, t in enumerate(targets)]
        tgt = torch.from_numpy(np.concatenate(rows))
        batch = {"img": images, "batch_idx": tgt[:, 0], "cls": tgt[:, 1:2], "bboxes": tgt[:, 2:6]}
        loss, _items = net.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        bar.update(1)
    bar.close()
    net.eval()
    net.criterion = None
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    return out


def detector_accuracy(yolo, images01: torch.Tensor, labels, imgsz: int = YOLO_SIZE, conf: float = 0.25) -> float:
    """Fraction of single-digit images whose most confident box has the right class."""
    hits = 0
    results = yolo.predict(list(to_uint8(images01)[..., ::-1]), imgsz=imgsz, conf=conf, verbose=False)
    for r, y in zip(results, labels):
        if len(r.boxes):
            hits += int(r.boxes.cls[r.boxes.conf.argmax()].item() == int(y))
    return hits / len(labels)


# ------------------------------------------------------------------------------------------- world
PARTS = ("sd", "clip", "blip", "yolo", "estimator")


def default_cache_dir(cfg: WorldConfig) -> Path:
    root = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))
    return root / f"digits-{cfg.seed}-{cfg.key()}"


# Parts that need neither the base pipeline nor each other. With two or more cores they train in a
# second process while the UNet trains: the tiny UNet gains little from a second thread, the VAE ~75%,
# so the VAE gets every thread and the UNet's first steps share the cores with these. The UNet takes
# all threads back at a fixed step, not when the other process ends, so the world stays deterministic
# (results depend on the thread count). On 2 idle cores the side parts take ~170 s, ~270 UNet steps.
SIDE_PARTS = ("clip", "blip", "yolo")
SIDE_META = "world-side.json"
SIDE_UNET_FRACTION = 0.25  # of the UNet's steps trained with half the threads


def build_world(out: str | Path, cfg: WorldConfig | None = None, *, overwrite: bool = False,
                parts: tuple[str, ...] = PARTS, jobs: int | None = None, meta_name: str = "world.json") -> Path:
    """``harness zoo build digits``: write OUT/sd, OUT/clip, OUT/blip, OUT/yolo, OUT/estimator.

    Each part is written atomically and skipped when already complete, so a killed build resumes;
    ``world.json`` records the config, the time each part took and its sanity numbers. ``jobs`` (default:
    2 when the machine has two cores) > 1 builds :data:`SIDE_PARTS` in a second process beside the UNet."""
    cfg = cfg or WorldConfig()
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise HarnessError(f"digits world: unknown part(s) {unknown}; known: {list(PARTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / meta_name
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("config", asdict(cfg)) != asdict(cfg) and not overwrite:
        raise HarnessError(f"{out}: holds a digits world built with another config; pass overwrite or use "
                           f"another folder")
    meta.update({"kind": "digits", "version": WORLD_VERSION, "config": asdict(cfg), "key": cfg.key()})
    meta.setdefault("parts", {})
    # A part that failed for this config (a short build's estimator) would fail again: not retried.
    todo = [n for n in parts if overwrite or not ((out / n).exists() or "failed" in meta["parts"].get(n, {}))]
    jobs = (2 if (os.cpu_count() or 1) >= 2 else 1) if jobs is None else jobs
    side = [n for n in todo if n in SIDE_PARTS] if jobs > 1 and "sd" in todo else []
    helper = _SideBuild(out, cfg, side, overwrite)
    ink, y = load_ink()
    train, _ = split_indices(len(y), cfg.seed)
    builders = {
        "sd": lambda d: build_base(cfg, d, after_vae=helper.start if side else None,
                                   threads_at=helper.threads_at if side else None),
        "clip": lambda d: _build_clip(cfg, ink[train], y[train], d),
        "blip": lambda d: _build_blip(cfg, ink[train], y[train], d),
        "yolo": lambda d: train_yolo(cfg, ink[train], y[train], d) and {},
        "estimator": lambda d: _build_estimator(cfg, out / "sd", d),
    }
    try:
        for name in todo:
            if name in side:
                continue
            log.info("digits world: training %s -> %s", name, out / name)
            t0 = time.perf_counter()
            try:
                with atomic_dir(out / name, overwrite=overwrite) as tmp:
                    info = builders[name](tmp) or {}
            except HarnessError as e:
                if name != "estimator":
                    raise
                # A short (test-sized) build may not train an estimator that beats the mean; the demo
                # then skips the artifact score instead of scoring with a collapsed model.
                log.warning("digits world: no artifact estimator: %s", e)
                info = {"failed": str(e)}
            meta["parts"][name] = {**info, "seconds": round(time.perf_counter() - t0, 1)}
            atomic_write_json(meta_path, meta)
    except BaseException:
        helper.stop()  # its parts are atomic: a stopped build leaves nothing half-written to resume from
        raise
    meta["parts"].update(helper.join().get("parts", {}))
    atomic_write_json(meta_path, meta)
    return out


class _SideBuild:
    """:data:`SIDE_PARTS` built by ``build_world(jobs=1)`` in a spawned process, one thread on each side."""

    def __init__(self, out: Path, cfg: WorldConfig, parts: list[str], overwrite: bool):
        self.out, self.cfg, self.parts, self.overwrite = out, cfg, parts, overwrite
        self.proc, self.threads = None, torch.get_num_threads()

    def start(self) -> None:
        import multiprocessing

        half = max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(half)
        log.info("digits world: training %s in a second process (%d thread(s) each)", ", ".join(self.parts), half)
        ctx = multiprocessing.get_context("spawn")  # a fork would inherit torch's thread pools
        self.proc = ctx.Process(target=_side_main, args=(str(self.out), asdict(self.cfg), self.parts,
                                                          self.overwrite, half, logging.getLogger().level))
        self.proc.start()

    def threads_at(self, step: int) -> int | None:
        """The UNet's thread count from ``step`` on, when it changes (see SIDE_UNET_FRACTION)."""
        if step == int(self.cfg.unet_steps * SIDE_UNET_FRACTION):
            log.info("digits world: UNet step %d: back to %d thread(s)", step, self.threads)
            return self.threads
        return None

    def stop(self) -> None:
        torch.set_num_threads(self.threads)
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()

    def join(self) -> dict:
        torch.set_num_threads(self.threads)
        if self.proc is None:
            return {}
        self.proc.join()
        if self.proc.exitcode != 0:
            raise HarnessError(f"digits world: the process building {', '.join(self.parts)} failed (exit code "
                               f"{self.proc.exitcode}; its log is above); run the build again to resume")
        path = self.out / SIDE_META
        side = json.loads(path.read_text()) if path.exists() else {}
        path.unlink(missing_ok=True)
        for info in side.get("parts", {}).values():
            info["process"] = "second"  # provenance: trained beside the UNet, one thread
        return side


def _side_main(out: str, cfg: dict, parts: list[str], overwrite: bool, threads: int, level: int) -> None:
    from harness.log import setup

    setup(quiet=level > logging.INFO)
    torch.set_num_threads(threads)
    build_world(out, WorldConfig(**cfg), overwrite=overwrite, parts=tuple(parts), jobs=1, meta_name=SIDE_META)


def digits_world(cfg: WorldConfig | None = None, cache_dir: str | Path | None = None,
                 parts: tuple[str, ...] = PARTS) -> Path:
    """The cached digits world for ``cfg`` (built on first use, minutes on two CPU cores)."""
    cfg = cfg or WorldConfig()
    return build_world(Path(cache_dir) if cache_dir else default_cache_dir(cfg), cfg, parts=parts)


def _build_clip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray, d: Path) -> dict:
    from harness.models.tiny import save_open_clip

    model = train_clip(cfg, ink, labels)
    save_open_clip(model, d, TINY_DIGITS_CLIP, IMAGE_SIZE)
    return {}


def _build_blip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray, d: Path) -> dict:
    model, processor = train_blip(cfg, ink, labels)
    model.save_pretrained(str(d))
    processor.save_pretrained(str(d))
    return {}


def planted_digits(out_dir: Path, n: int, seed: int, ink: torch.Tensor, labels: np.ndarray) -> Path:
    """``n`` styled digits with artifacts planted at severities 0..5 (equally common) + ratings.csv."""
    import pandas as pd
    from PIL import Image

    from harness.estimator.artifacts import plant

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    idx = torch.randint(0, len(ink), (n,), generator=gen)
    images, _, _ = styled_batch(ink, labels, idx, all_styles(), gen)
    severities = np.resize(np.arange(6), n)
    rng.shuffle(severities)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, s) in enumerate(zip(to_uint8(images), severities)):
        name = f"{i:05d}_s{s}.png"
        Image.fromarray(plant(img, int(s), rng)).save(out_dir / name)
        rows.append({"image": name, "rating": int(s), "group": f"g{i % 40}"})
    pd.DataFrame(rows).to_csv(out_dir / "ratings.csv", index=False)
    return out_dir / "ratings.csv"


def _build_estimator(cfg: WorldConfig, sd_dir: Path, d: Path) -> dict:
    """The project's artifact estimator (harness.estimator), trained on digits with planted artifacts,
    on the world's VAE previews and CLIP."""
    import tempfile

    from harness.estimator.dataset import build_dataset
    from harness.estimator.train import train_estimator

    ink, y = load_ink()
    train, _ = split_indices(len(y), cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        table = planted_digits(Path(tmp) / "images", 600, cfg.seed + 60, ink[train], y[train])
        ds = build_dataset(table, Path(tmp) / "ds", vae_source=sd_dir, timesteps=(0, 400), draws=1,
                           seed=cfg.seed, preview_kind="vae", image_size=IMAGE_SIZE, preview_size=IMAGE_SIZE)
        result = train_estimator(ds, d, clip=f"local-dir:{sd_dir.parent / 'clip'}", head="ordinal",
                                 steps=cfg.estimator_steps, warmup=min(30, cfg.estimator_steps // 10),
                                 seed=cfg.seed, finetune_clip=False)
    final = result.metrics["per_timestep"]
    return {"heldout": final}


def build_digits_zoo(out: str | Path, *, seed: int = 0, overwrite: bool = False, scale: float = 1.0) -> Path:
    """The ``digits`` kind of ``harness zoo build``."""
    return build_world(out, WorldConfig(seed=seed).scaled(scale), overwrite=overwrite)
