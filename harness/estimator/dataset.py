"""``harness estimator build``: ratings table -> noisy-latent previews at several timesteps, cached.

Per image: load it with its aspect kept (long side = ``image_size``, sides cropped down to a
multiple of 8 - never squashed), encode it with the SD VAE (latent mean x scaling factor, the
pipeline's latent space), forward-noise the latent with the scheduler's ``add_noise`` at every
requested timestep with ``draws`` seeded noise draws, and make the preview the estimator sees:
the linear latent-to-RGB sketch or a VAE decode, letterboxed (padded, not stretched) into a square.

Timestep 0 means the clean latent: the final image. Noise for (image, timestep, draw) is drawn from
a generator seeded by (seed, image index, timestep, draw), so a rebuild is bit-identical no matter
the order or batch. VAE latents - the expensive part - are cached per image file content.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.io import atomic_write, atomic_write_json
from harness.provenance import file_sha256, record

log = logging.getLogger(__name__)

PREVIEWS = ("linear", "vae")
DATASET_FILE = "samples.safetensors"
META_FILE = "dataset.json"
LATENT_CACHE = "latents.safetensors"
PAD_VALUE = 0.5  # letterbox grey: the middle of the preview's [0, 1] range


# --- loading the VAE and the noise schedule ----------------------------------------------------

def load_vae(source: str | Path, dtype: torch.dtype = torch.float32, *, allow_pickle: bool = False):
    """An ``AutoencoderKL`` from anything :func:`harness.models.load.load_pipeline` reads (a diffusers
    pipeline folder, a single ``.safetensors`` file, ``.ckpt`` with ``allow_pickle``, a hub id), or a
    standalone VAE folder (``config.json`` + weights)."""
    from diffusers import AutoencoderKL

    from harness.models.load import load_pipeline, resolve_source

    p = Path(source)
    try:
        if (p / "vae" / "config.json").exists():
            return AutoencoderKL.from_pretrained(str(p), subfolder="vae", torch_dtype=dtype).eval()
        if (p / "config.json").exists():
            return AutoencoderKL.from_pretrained(str(p), torch_dtype=dtype).eval()
        if p.is_dir():
            raise HarnessError(f"{p}: not a diffusers pipeline folder (no vae/config.json) nor a VAE folder "
                               "(no config.json)")
        src = resolve_source(source)
        if src.kind == "hub":  # the VAE alone, not the whole pipeline's download
            return AutoencoderKL.from_pretrained(src.ref, subfolder="vae", torch_dtype=dtype).eval()
        # single files hold every component in one LDM state dict: convert through the models loader
        return load_pipeline(src.ref, dtype=dtype, allow_pickle=allow_pickle).vae.eval()
    except OSError as e:
        raise HarnessError(f"{source}: cannot load a VAE from it ({str(e).splitlines()[0]})") from e


def load_noise_scheduler(source: str | Path | None):
    """The training noise schedule (``DDPMScheduler``) from ``source/scheduler``; SD 1.5's if absent."""
    from diffusers import DDPMScheduler

    from harness.models.tiny import SD15_SCHEDULER

    cfg_path = Path(source) / "scheduler" / "scheduler_config.json" if source else None
    if cfg_path is not None and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
    else:
        cfg = dict(SD15_SCHEDULER)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    return DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg})


def vae_identity(vae, source: str | Path | None = None) -> dict:
    """What ties an estimator to its VAE: architecture, scaling factor and a hash of weights at both ends
    (cast to fp16 so an fp16 copy of the same VAE matches)."""
    cfg = vae.config
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()
            if k in ("latent_channels", "block_out_channels", "layers_per_block", "in_channels", "out_channels",
                     "scaling_factor", "shift_factor")}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_out.weight"):
        t = dict(vae.named_parameters()).get(name)
        if t is not None:
            h.update(t.detach().to("cpu", torch.float16).numpy().tobytes())
    return {"fingerprint": h.hexdigest()[:16], "config": arch, "source": str(source) if source else None}


def check_vae(expected: dict, vae, where: str) -> None:
    got = vae_identity(vae)
    if got["fingerprint"] != expected.get("fingerprint"):
        raise HarnessError(
            f"{where}: estimator was trained with VAE {expected.get('fingerprint')} "
            f"(from {expected.get('source')}, scaling_factor {expected.get('config', {}).get('scaling_factor')}) "
            f"but is used with VAE {got['fingerprint']} (scaling_factor {got['config'].get('scaling_factor')}); "
            "its previews would not match - use the same VAE or retrain the estimator")


# --- images, latents, previews ------------------------------------------------------------------

def load_image(path: str | Path, long_side: int) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1]; long side = ``long_side``, aspect kept, sides cropped to a multiple of 8."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = long_side / max(w, h)
            nw, nh = max(8, round(w * s)), max(8, round(h * s))
            im = im.resize((nw, nh), Image.BICUBIC)
    except (OSError, ValueError) as e:
        raise HarnessError(f"{path}: cannot read image ({e})") from e
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    ch, cw = nh // 8 * 8, nw // 8 * 8
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return x[:, top:top + ch, left:left + cw].unsqueeze(0).contiguous()


def pixels_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (0..255) or float in [0, 1] -> float in [-1, 1]."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return x * 2 - 1


@torch.no_grad()
def encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents in the pipeline's space (posterior mean x scaling factor)."""
    dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype
    z = vae.encode(x.to(dev, dt)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def letterbox(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, h, w] in [0, 1] -> [B, 3, size, size]: long side scaled to ``size``, short side padded."""
    _, _, h, w = x.shape
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(x, (left, size - nw - left, top, size - nh - top), value=PAD_VALUE)


@torch.no_grad()
def preview(latents: torch.Tensor, kind: str, size: int, vae=None) -> torch.Tensor:
    """Noisy latents -> the estimator's input: float [B, 3, size, size] in [0, 1]."""
    if kind == "linear":
        from harness.models.preview import latent_to_rgb

        rgb = latent_to_rgb(latents.float())
    elif kind == "vae":
        if vae is None:
            raise HarnessError("preview 'vae' needs the VAE")
        dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        img = vae.decode(latents.to(dev, dt) / vae.config.scaling_factor + shift).sample
        rgb = ((img.float() + 1) / 2).clamp(0, 1)
    else:
        raise HarnessError(f"preview: unknown kind {kind!r}; known: {', '.join(PREVIEWS)}")
    return letterbox(rgb.cpu(), size)


def noise_seed(seed: int, image_index: int, timestep: int, draw: int) -> int:
    key = f"{seed}:{image_index}:{timestep}:{draw}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def noised(scheduler, z: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
    """``z`` forward-noised to ``timestep`` with noise from ``seed`` (timestep 0 = clean)."""
    if timestep == 0:
        return z
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(z.shape, generator=g)
    return scheduler.add_noise(z, eps, torch.tensor([timestep]))


def parse_timesteps(spec: str | Sequence[int], num_train_timesteps: int = 1000) -> list[int]:
    """``"0,250,500"``, ``"0:1000:250"`` (start:stop:step, stop excluded) or a list of ints."""
    if isinstance(spec, str):
        try:
            if ":" in spec:
                a, b, c = (int(v) for v in spec.split(":"))
                ts = list(range(a, b, c))
            else:
                ts = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError as e:
            raise HarnessError(f"timesteps: expected '0,250,500' or 'start:stop:step', got {spec!r}") from e
    else:
        ts = [int(v) for v in spec]
    bad = [t for t in ts if not 0 <= t < num_train_timesteps]
    if not ts or bad:
        raise HarnessError(f"timesteps: expected values in 0..{num_train_timesteps - 1}, got {ts}")
    return sorted(set(ts))


# --- the build ----------------------------------------------------------------------------------

def _latent_key(path: Path, image_size: int, vae_fp: str) -> str:
    return f"{file_sha256(path)[:24]}_{image_size}_{vae_fp}"


def _load_cache(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path)) if path.exists() else {}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def build_dataset(table, out_dir: str | Path, *, vae_source: str | Path, timesteps: str | Sequence[int] = (
        0, 200, 400, 600, 800), draws: int = 2, seed: int = 0, preview_kind: str = "linear",
        image_size: int = 512, preview_size: int = 64, device: str = "cpu",
        vae=None, scheduler=None) -> Path:
    """Build (or reuse) the sample cache in ``out_dir`` from a ratings ``table`` (a DataFrame from
    :func:`harness.estimator.table.read_ratings`, or a path to one). Returns ``out_dir``.

    Samples: every image x every timestep x ``draws`` noise draws (one for timestep 0)."""
    from harness.estimator.table import read_ratings

    if preview_kind not in PREVIEWS:
        raise HarnessError(f"preview: unknown kind {preview_kind!r}; known: {', '.join(PREVIEWS)}")
    if draws < 1:
        raise HarnessError(f"draws: expected >= 1, got {draws}")
    df = read_ratings(table) if not hasattr(table, "columns") else table
    out = Path(out_dir)
    vae = vae if vae is not None else load_vae(vae_source).to(device)
    scheduler = scheduler if scheduler is not None else load_noise_scheduler(vae_source)
    ts = parse_timesteps(timesteps, scheduler.config.num_train_timesteps)
    ident = vae_identity(vae, vae_source)
    images = [{"image": str(r.image), "rating": float(r.rating), "group": str(r.group),
               "prompt": None if r.prompt is None else str(r.prompt), "seed": r.seed} for r in df.itertuples()]
    settings = {"timesteps": ts, "draws": draws, "seed": seed, "preview": preview_kind, "image_size": image_size,
                "preview_size": preview_size, "vae": ident["fingerprint"],
                "schedule": {k: scheduler.config[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                               "beta_schedule")}}
    key = hashlib.sha256(json.dumps([settings, [(i["image"], i["rating"]) for i in images]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    meta_path = out / META_FILE
    if meta_path.exists() and (out / DATASET_FILE).exists():
        old = json.loads(meta_path.read_text())
        if old.get("key") == key:
            log.info("estimator dataset %s is up to date (key %s); reusing it", out, key)
            return out
    latents = _encode_all(vae, images, out / LATENT_CACHE, image_size, ident["fingerprint"], device)
    tensors = _noise_and_preview(latents, images, ts, draws, seed, preview_kind, preview_size, vae, scheduler)
    _save_tensors(out / DATASET_FILE, tensors)
    atomic_write_json(meta_path, {
        "key": key, **settings, "vae_identity": ident, "images": images, "num_samples": len(tensors["rating"]),
        "provenance": record(),
    })
    log.info("estimator dataset: %d images x %d timesteps -> %d samples in %s", len(images), len(ts),
             len(tensors["rating"]), out)
    return out


def _encode_all(vae, images, cache_path: Path, image_size: int, vae_fp: str, device: str,
                batch_size: int = 16) -> list[torch.Tensor]:
    from harness.progress import Progress

    cache = _load_cache(cache_path)
    keys = [_latent_key(Path(i["image"]), image_size, vae_fp) for i in images]
    todo = sorted({k: n for n, k in enumerate(keys) if k not in cache}.items(), key=lambda kv: kv[1])
    if todo:
        # Same-shape images are encoded together: batching is ~10x faster than one by one.
        by_shape: dict[tuple, list] = {}
        for k, n in todo:
            x = load_image(images[n]["image"], image_size)
            by_shape.setdefault(tuple(x.shape), []).append((k, x))
        with Progress(total=len(todo), desc="encode", leave=False) as bar:
            for items in by_shape.values():
                for i in range(0, len(items), batch_size):
                    chunk = items[i:i + batch_size]
                    z = encode(vae, torch.cat([x for _, x in chunk]).to(device)).cpu()
                    cache.update({k: z[j].clone() for j, (k, _) in enumerate(chunk)})
                    bar.update(len(chunk))
        _save_tensors(cache_path, cache)
    log.info("latents: %d encoded, %d from cache", len(todo), len(keys) - len(todo))
    return [cache[k] for k in keys]


def _noise_and_preview(latents, images, ts, draws, seed, kind, size, vae, scheduler) -> dict:
    from harness.progress import Progress

    jobs = [(i, t, d) for i in range(len(images)) for t in ts for d in range(1 if t == 0 else draws)]
    previews = torch.empty((len(jobs), 3, size, size), dtype=torch.uint8)
    j = 0
    for i in Progress(range(len(images)), desc="previews", leave=False):
        # Latents differ in shape (aspect kept): one image at a time, all its timesteps and draws at once.
        mine = [(t, d) for t in ts for d in range(1 if t == 0 else draws)]
        x = torch.cat([noised(scheduler, latents[i].unsqueeze(0), t, noise_seed(seed, i, t, d)) for t, d in mine])
        previews[j:j + len(mine)] = (preview(x, kind, size, vae) * 255).round().to(torch.uint8)
        j += len(mine)
    return {
        "previews": previews,
        "timestep": torch.tensor([t for _, t, _ in jobs], dtype=torch.int64),
        "draw": torch.tensor([d for _, _, d in jobs], dtype=torch.int64),
        "image_index": torch.tensor([i for i, _, _ in jobs], dtype=torch.int64),
        "rating": torch.tensor([images[i]["rating"] for i, _, _ in jobs], dtype=torch.float32),
    }


def load_dataset(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata written by :func:`build_dataset`."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / DATASET_FILE).exists() or not (p / META_FILE).exists():
        raise HarnessError(f"{p}: not an estimator dataset (expected {DATASET_FILE} and {META_FILE}); "
                           "run 'harness estimator build' first")
    return load_file(str(p / DATASET_FILE)), json.loads((p / META_FILE).read_text())
