"""The estimator network: CLIP image embedding (+ optional learned conv features) + timestep -> a head.

The head is an MLP *with* nonlinearities (the seed's copy had its activations switched off, making
it one linear map). Heads (a registry, so the CLI lists them):

* ``regression`` - one output, the rating rescaled to [0, 1]; prediction = rescaled back.
* ``ordinal`` - K-1 cumulative logits P(rating > level_k) (CORAL-style); prediction = lo + sum of
  probabilities x level spacing. Gives P(rating > threshold) directly, which early stopping uses.
* ``classification`` - K logits over the levels; prediction = the expected level.

Saved as one safetensors file (weights; the JSON config also rides in its metadata) plus the same
config as JSON next to it: which CLIP, which preview, which timesteps, the rating scale and the VAE
identity, so a later user cannot silently pair it with another VAE.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

HEADS = ("regression", "ordinal", "classification")
WEIGHTS_FILE = "estimator.safetensors"
CONFIG_FILE = "estimator.json"
FORMAT = "harness-artifact-estimator/1"


@dataclasses.dataclass
class EstimatorConfig:
    clip: str = "local-dir:"  # open_clip model name, or 'local-dir:PATH'
    clip_pretrained: str | None = None
    clip_model_cfg: dict | None = None  # open_clip architecture, so weights saved here rebuild offline
    clip_image_size: int = 224
    clip_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    clip_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    finetune_clip: bool = True
    conv_features: bool = True
    head: str = "ordinal"
    scale: tuple = (0.0, 5.0)
    levels: tuple = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    hidden: int = 128
    t_dim: int = 32
    dropout: float = 0.1
    preview: str = "linear"
    preview_size: int = 64
    image_size: int = 512
    timesteps: tuple = (0,)
    num_train_timesteps: int = 1000
    vae: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "estimator config") -> EstimatorConfig:
        if d.get("format") != FORMAT:
            raise HarnessError(f"{where}: format {d.get('format')!r} is not {FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"format"})
        if unknown:
            raise HarnessError(f"{where}: unknown key(s) {unknown}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)


def load_clip(name: str, pretrained: str | None = None):
    """(open_clip model, model_cfg or None, image_size, mean, std) for a name or 'local-dir:PATH'."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except (RuntimeError, ValueError, FileNotFoundError, OSError) as e:
        raise HarnessError(f"clip: cannot load {name!r} (pretrained={pretrained!r}): {str(e).splitlines()[0]}") \
            from e
    cfg = None
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]) / "open_clip_config.json"
        cfg = json.loads(path.read_text()).get("model_cfg")
    else:
        cfg = open_clip.get_model_config(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    return model, cfg, int(size), mean, std


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (as in diffusion UNets)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ConvFeatures(nn.Module):
    """A small learned CNN over the preview, pooled by mean *and* std: the std keeps local texture
    energy (noise blotches, blocking) that a mean pool would average away."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(),
        )
        self.out_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)


def head_outputs(cfg: EstimatorConfig) -> int:
    k = len(cfg.levels)
    return {"regression": 1, "ordinal": k - 1, "classification": k}[cfg.head]


class ArtifactEstimatorNet(nn.Module):
    """previews [B, 3, P, P] in [0, 1] + timesteps [B] -> head outputs [B, K]."""

    def __init__(self, cfg: EstimatorConfig, visual: nn.Module | None, clip_dim: int):
        super().__init__()
        if cfg.head not in HEADS:
            raise HarnessError(f"head: unknown {cfg.head!r}; known: {', '.join(HEADS)}")
        self.cfg = cfg
        self.visual = visual
        self.conv = ConvFeatures() if cfg.conv_features else None
        in_dim = (clip_dim if visual is not None else 0) + (self.conv.out_dim if self.conv else 0) + cfg.t_dim
        self.t_proj = nn.Sequential(nn.Linear(cfg.t_dim, cfg.t_dim), nn.GELU())
        self.mlp = nn.Sequential(
            nn.BatchNorm1d(in_dim), nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, head_outputs(cfg)),
        )
        self.register_buffer("mean", torch.tensor(cfg.clip_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.clip_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def clip_input(self, x: torch.Tensor) -> torch.Tensor:
        # Previews are square already (letterboxed), so this resize never changes the aspect.
        s = self.cfg.clip_image_size
        if x.shape[-1] != s:
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=x.shape[-1] > s)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.visual is not None:
            emb = self.visual(self.clip_input(x))
            if isinstance(emb, (tuple, list)):
                emb = emb[0]
            parts.append(F.normalize(emb.float(), dim=-1) * math.sqrt(emb.shape[-1]))
        if self.conv is not None:
            parts.append(self.conv(x * 2 - 1))
        scaled_t = t.float() * (1000.0 / self.cfg.num_train_timesteps)
        parts.append(self.t_proj(timestep_embedding(scaled_t, self.cfg.t_dim)))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(x, t))

    # -- interpreting the head ---------------------------------------------------------------------
    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Head outputs -> predicted rating on the declared scale."""
        lo, hi = self.cfg.scale
        levels = torch.tensor(self.cfg.levels, dtype=torch.float32, device=out.device)
        if self.cfg.head == "regression":
            return (lo + out[:, 0] * (hi - lo)).clamp(lo, hi)
        if self.cfg.head == "ordinal":
            return levels[0] + (torch.sigmoid(out) * torch.diff(levels)).sum(dim=1)
        return (out.softmax(dim=1) * levels).sum(dim=1)

    def prob_above(self, out: torch.Tensor, threshold: float, temperature: float = 0.5) -> torch.Tensor:
        """P(rating > threshold) (regression: a logistic around the prediction, width ``temperature``)."""
        levels = torch.tensor(self.cfg.levels, dtype=torch.float32, device=out.device)
        if self.cfg.head == "ordinal":
            # P(y > level_k) for each k; threshold between levels -> the next level's probability.
            p = torch.sigmoid(out)
            k = int((levels[:-1] < threshold).sum().clamp(max=len(levels) - 2))
            return p[:, k]
        if self.cfg.head == "classification":
            return out.softmax(dim=1)[:, levels > threshold].sum(dim=1)
        return torch.sigmoid((self.predict(out) - threshold) / temperature)


def targets_for(cfg: EstimatorConfig, rating: torch.Tensor) -> torch.Tensor:
    """Ratings -> the head's training target."""
    lo, hi = cfg.scale
    levels = torch.tensor(cfg.levels, dtype=torch.float32)
    if cfg.head == "regression":
        return ((rating - lo) / (hi - lo)).unsqueeze(1)
    if cfg.head == "ordinal":
        return (rating.unsqueeze(1) > levels[:-1].unsqueeze(0)).float()
    return (rating.unsqueeze(1) - levels.unsqueeze(0)).abs().argmin(dim=1)


def head_loss(cfg: EstimatorConfig, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample loss, weighted (class balance) and averaged."""
    if cfg.head == "regression":
        per = F.smooth_l1_loss(out, target, reduction="none", beta=0.1).mean(dim=1)
    elif cfg.head == "ordinal":
        per = F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(dim=1)
    else:
        per = F.cross_entropy(out, target, reduction="none")
    return (per * weight).sum() / weight.sum()


def build_net(cfg: EstimatorConfig, clip_model=None) -> ArtifactEstimatorNet:
    """The network for ``cfg``; ``clip_model`` (open_clip) supplies the visual tower's architecture and
    pretrained weights (``None`` with a saved fine-tuned tower: rebuilt from ``clip_model_cfg``)."""
    visual = None
    clip_dim = 0
    if cfg.clip:
        if clip_model is None:
            clip_model = _rebuild_clip(cfg)
        visual = clip_model.visual
        with torch.no_grad():
            probe = visual(torch.zeros(1, 3, cfg.clip_image_size, cfg.clip_image_size))
        clip_dim = (probe[0] if isinstance(probe, (tuple, list)) else probe).shape[-1]
        if not cfg.finetune_clip:
            visual.requires_grad_(False)
    return ArtifactEstimatorNet(cfg, visual, clip_dim)


def _rebuild_clip(cfg: EstimatorConfig):
    import open_clip

    if cfg.finetune_clip and cfg.clip_model_cfg:
        # The fine-tuned tower's weights are in the estimator file: only the architecture is needed.
        mc = cfg.clip_model_cfg
        return open_clip.CLIP(mc["embed_dim"], mc["vision_cfg"], mc["text_cfg"])
    return load_clip(cfg.clip, cfg.clip_pretrained)[0]


def save_estimator(net: ArtifactEstimatorNet, out_dir: str | Path) -> Path:
    """Write ``out_dir/estimator.safetensors`` (+ config in its metadata) and ``out_dir/estimator.json``."""
    from safetensors.torch import save

    out = Path(out_dir)
    cfg = net.cfg.to_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()
             if net.cfg.finetune_clip or not k.startswith("visual.")}
    data = save(state, metadata={"harness_estimator": json.dumps(cfg)})
    atomic_write(out / WEIGHTS_FILE, lambda f: f.write(data))
    atomic_write_json(out / CONFIG_FILE, cfg)
    return out / WEIGHTS_FILE


def load_estimator(path: str | Path, device: str = "cpu") -> ArtifactEstimatorNet:
    """An estimator from its folder or its ``.safetensors`` file (config read from the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    f = p / WEIGHTS_FILE if p.is_dir() else p
    if not f.exists():
        raise HarnessError(f"{p}: no estimator there (expected {WEIGHTS_FILE})")
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = (fh.metadata() or {}).get("harness_estimator")
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise HarnessError(f"{f}: not a safetensors file ({e})") from e
    if meta is None:
        raise HarnessError(f"{f}: not a harness estimator (no 'harness_estimator' metadata)")
    cfg = EstimatorConfig.from_dict(json.loads(meta), str(f))
    net = build_net(cfg)
    state = load_file(str(f))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if cfg.finetune_clip or not k.startswith("visual.")]
    if missing or unexpected:
        raise HarnessError(f"{f}: weights do not match its config (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    return net.to(device).eval()
