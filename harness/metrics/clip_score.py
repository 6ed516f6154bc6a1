"""CLIP score: 100 * max(cos(image, prompt), 0) per image, and its mean with a bootstrap interval.

torchmetrics' ``CLIPScore`` clamps the MEAN at 0; here each image is clamped, so one negative pair
cannot cancel a positive one. Backends:
  ``clip:NAME_OR_PATH``  open_clip (a folder loads as ``local-dir:``), its own tokenizer;
  ``hf:NAME_OR_PATH``    transformers ``CLIPModel`` + processor (transformers 5 returns output objects
                         from ``get_image_features``/``get_text_features``: unwrapped here);
  ``(model, processor)`` a transformers pair already loaded.
Images go through the same uint8 rounding and PIL-bicubic resize as every other metric.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

from harness.errors import HarnessError
from harness.metrics.base import cat_state, record
from harness.metrics.bootstrap import mean_ci
from harness.metrics.features import _image_size_of, _local_identity, _normalize_of, load_open_clip
from harness.metrics.images import to_batch

log = logging.getLogger(__name__)


def _features(out) -> torch.Tensor:
    """transformers 5 wraps projected features in an output object; older versions return the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    raise HarnessError(f"clip_score: cannot find features in {type(out).__name__}")


class _OpenClip:
    def __init__(self, spec: str, device):
        import open_clip

        self.model, preprocess, self.identity, name = load_open_clip(spec, device=device)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.mean, self.std = _normalize_of(preprocess)
        self.input_size, self.device = _image_size_of(self.model), device

    def image(self, pixels):
        return self.model.encode_image(pixels)

    def text(self, prompts):
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))


class _HFClip:
    def __init__(self, spec, device):
        if isinstance(spec, tuple):
            self.model, self.processor = spec
            self.identity = f"hf:{type(self.model).__name__}@{getattr(self.model.config, '_name_or_path', '')}"
        else:
            from transformers import AutoProcessor, CLIPModel

            try:
                self.model = CLIPModel.from_pretrained(spec)
                self.processor = AutoProcessor.from_pretrained(spec)
            except Exception as e:
                raise HarnessError(f"hf:{spec}: cannot load a transformers CLIP ({type(e).__name__}: {e})"
                                   .split("\n")[0]) from e
            p = Path(spec)
            self.identity = _local_identity("hf", p) if p.is_dir() else f"hf:{spec}"
        self.model = self.model.eval().to(device)
        ip = self.processor.image_processor
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        self.input_size, self.device = int(self.model.config.vision_config.image_size), device

    def image(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    def text(self, prompts):
        t = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                                     max_length=self.model.config.text_config.max_position_embeddings)
        return _features(self.model.get_text_features(input_ids=t["input_ids"].to(self.device),
                                                      attention_mask=t["attention_mask"].to(self.device)))


def load_clip_backend(spec, device="cpu"):
    if isinstance(spec, tuple):
        return _HFClip(spec, device)
    if isinstance(spec, str) and spec.startswith("clip:") and len(spec) > 5:
        return _OpenClip(spec[5:], device)
    if isinstance(spec, str) and spec.startswith("hf:") and len(spec) > 3:
        return _HFClip(spec[3:], device)
    raise HarnessError(f"clip_score model {spec!r}: expected 'clip:NAME_OR_PATH' (open_clip), "
                       "'hf:NAME_OR_PATH' (transformers) or a (CLIPModel, processor) pair")


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per pair: 100 * max(cos, 0)."""
    cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return 100 * cos.clamp(min=0)


class CLIPScore(Metric):
    """``update(images, prompts)``: one prompt per image; ``compute()`` -> mean; per-image in ``scores()``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, model="clip:ViT-B-32:openai", *, device="cpu", **kwargs):
        super().__init__(**kwargs)
        self.__dict__["backend"] = load_clip_backend(model, device=torch.device(device))
        self.add_state("per_image", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(self, images, prompts: Sequence[str]) -> None:  # type: ignore[override]
        if isinstance(prompts, str):
            prompts = [prompts]
        b = self.backend
        pixels = to_batch(images, b.input_size)
        if len(pixels) != len(prompts):
            raise HarnessError(f"clip_score: {len(pixels)} images but {len(prompts)} prompts; "
                               "give exactly one prompt per image")
        m = torch.tensor(b.mean).view(1, 3, 1, 1)
        s = torch.tensor(b.std).view(1, 3, 1, 1)
        x = ((pixels.float() / 255 - m) / s).to(b.device)
        self.per_image.append(clip_scores(b.image(x), b.text(prompts)).double().cpu())

    def scores(self) -> np.ndarray:
        return cat_state(self.per_image).cpu().numpy().reshape(-1)

    def compute(self):
        s = self.scores()
        if len(s) == 0:
            raise HarnessError("clip_score: no images were scored")
        return torch.tensor(float(s.mean()), dtype=torch.float64)

    def compute_ci(self, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
        with self.sync_context():
            s = self.scores()
            if len(s) == 0:
                raise HarnessError("clip_score: no images were scored")
            ci = mean_ci(s, n_boot=n_boot, alpha=alpha, seed=seed)
            return record("clip_score", float(s.mean()), n_a=len(s), n_b=None, ci=ci,
                          extra={"extractor": self.backend.identity, "input_size": self.backend.input_size,
                                 "per_image": s.tolist(), "clamp": "per image"})
