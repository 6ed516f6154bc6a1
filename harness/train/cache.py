"""On-disk cache of VAE latents and text-encoder outputs, so each image is encoded once across epochs
and runs.

A latent entry is keyed by the dataset item's ``key`` (sha256 of the image bytes and every
preprocessing parameter: size, crop, filter, flip) under a folder named by the VAE's weight hash; a
text entry by sha256 of the caption under a folder named by the text encoder's and tokenizer's hash.
Change the image, its size or crop, or the model, and the key changes: a miss, never a stale hit. The
latent entry stores the encoder's distribution (mean and log-variance) rather than one sample, so
training still draws a fresh sample each step, exactly as without the cache. Each entry is one
safetensors file written atomically; a corrupt entry is treated as a miss and rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from harness.io import atomic_write_bytes

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "harness" / "train"


def module_hash(module: torch.nn.Module, extra: str = "") -> str:
    """sha256 of a module's class, parameter names, shapes, dtypes and values."""
    h = hashlib.sha256(f"{type(module).__name__}\x00{extra}".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TensorCache:
    """``key -> {name: tensor}`` files under ``root/kind/model_hash[:16]/key[:2]/key.safetensors``."""

    def __init__(self, root: str | Path, kind: str, model_hash: str):
        self.dir = Path(root) / kind / model_hash[:16]
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            out = load_file(str(p))
        except Exception as e:  # a torn or corrupt entry is a miss, not a crash
            log.warning("cache entry %s is unreadable (%s); re-encoding", p, type(e).__name__)
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write_bytes(self.path(key), data)


def text_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


@torch.no_grad()
def encode_latent_dist(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's Gaussian as [B, 2C, h, w] (mean and log-variance), in fp32."""
    return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters.float()


def sample_latents(dist: torch.Tensor, scaling_factor: float, generator: torch.Generator | None) -> torch.Tensor:
    """A draw from N(mean, exp(logvar)) scaled like diffusers' training example (clamped as in
    DiagonalGaussianDistribution)."""
    mean, logvar = dist.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return (mean + std * eps.to(mean.device)) * scaling_factor


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(text_encoder, tokenizer, captions: list[str], clip_skip: int | None = None) -> torch.Tensor:
    """The hidden states the UNet is conditioned on; ``clip_skip`` n > 1 takes the n-th layer from the end
    through the final layer norm (A1111's and sd-scripts' "clip skip"; 1 or None is the last layer)."""
    ids = tokenize(tokenizer, captions).to(text_encoder.device)
    if not clip_skip or clip_skip == 1:
        return text_encoder(ids, return_dict=False)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    # transformers >= 5.6 has no text_model level in CLIPTextModel
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


class TextCache:
    """Caption -> text-encoder hidden states, in memory and on disk (captions repeat every epoch)."""

    def __init__(self, root: str | Path, text_encoder, tokenizer, clip_skip: int | None = None):
        vocab = repr((sorted(tokenizer.get_vocab().items()), tokenizer.model_max_length))
        skip = "" if not clip_skip or clip_skip == 1 else f":clip_skip={clip_skip}"  # old caches stay valid
        tok_hash = hashlib.sha256((vocab + skip).encode()).hexdigest()
        self.store = TensorCache(root, "text", module_hash(text_encoder, extra=tok_hash))
        self.text_encoder, self.tokenizer, self.clip_skip = text_encoder, tokenizer, clip_skip
        self.memory: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = []
        for c in dict.fromkeys(captions):
            if c in self.memory:
                continue
            hit = self.store.get(text_key(c))
            if hit is None:
                missing.append(c)
            else:
                self.memory[c] = hit["hidden"]
        if missing:
            hidden = encode_text(self.text_encoder, self.tokenizer, missing, self.clip_skip).float().cpu()
            for c, h in zip(missing, hidden):
                self.memory[c] = h
                self.store.put(text_key(c), {"hidden": h})
        return torch.stack([self.memory[c] for c in captions])


class LatentCache:
    """Dataset item key -> latent distribution, filled by :meth:`fill` before training starts."""

    def __init__(self, root: str | Path, vae):
        self.store = TensorCache(root, "latents", module_hash(vae))
        self.vae = vae

    def fill(self, dataset, indices: list[int], batch_size: int = 8, progress: bool = False) -> dict[int, str]:
        """Encode every item of ``indices`` that is not cached yet; returns ``{index: key}``."""
        from harness.progress import Progress

        keys: dict[int, str] = {}
        # Pending images grouped by size: with aspect buckets one batch of the VAE holds one shape.
        pending: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for i in Progress(indices, desc="caching latents", disable=not progress, leave=False):
            item = dataset[i]
            keys[i] = item["key"]
            if self.store.get(item["key"]) is None:
                group = pending.setdefault(tuple(item["pixel_values"].shape), [])
                group.append((item["key"], item["pixel_values"]))
                if len(group) >= batch_size:
                    self._encode(group)
        for group in pending.values():
            self._encode(group)
        return keys

    def _encode(self, pending: list) -> None:
        if not pending:
            return
        dist = encode_latent_dist(self.vae, torch.stack([p for _, p in pending]))
        for (key, _), d in zip(pending, dist):
            self.store.put(key, {"dist": d})
        pending.clear()

    def get(self, key: str) -> torch.Tensor:
        hit = self.store.get(key)
        if hit is None:
            raise KeyError(key)
        return hit["dist"]
