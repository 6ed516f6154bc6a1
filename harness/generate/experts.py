"""Timestep experts: a chain of UNets, each owning a range of noise levels (seed 001's late steps).

Seed 001 trains a refiner only on ``t ∈ [250, 500)`` (``torch.randint(250, 500)``), then a second
model on ``t ∈ [0, 250)`` fine-tuned from the first, and refines an image by noising it to t = 500
and running only the last sampling steps. Sampling runs t downwards, so its "steps 500-750" are
t ∈ [250, 500) and "751-1000" are t ∈ [0, 250). :class:`TimestepExperts` stands in for the
pipeline's UNet and sends each sample to the expert that owns its current timestep (the base UNet
for timesteps no expert owns), so a refine from t = 500 runs exactly the ranges the experts learned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from harness.errors import ConfigError

log = logging.getLogger(__name__)

# UNet config keys that must match for two UNets to stand in for each other
SHAPE_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "block_out_channels",
              "down_block_types", "up_block_types", "layers_per_block", "sample_size")
# scheduler config keys that fix what a timestep means (the noise level at t)
NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


@dataclass(frozen=True)
class ExpertSpec:
    source: str
    t_min: int  # owns t_min <= t < t_max
    t_max: int

    @property
    def label(self) -> str:
        return f"{self.source}:{self.t_min}-{self.t_max}"


def parse_expert(text: str) -> ExpertSpec:
    """``PATH:LO-HI`` (e.g. ``runs/a/final:250-500``): the checkpoint owns timesteps LO <= t < HI."""
    source, sep, rng = text.rpartition(":")
    lo, dash, hi = rng.partition("-")
    if not sep or not source or not dash or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ConfigError(f"--expert {text!r}: expected CHECKPOINT:LO-HI, e.g. runs/a/final:250-500")
    spec = ExpertSpec(source, int(lo), int(hi))
    if spec.t_min >= spec.t_max:
        raise ConfigError(f"--expert {text!r}: the range {spec.t_min}-{spec.t_max} is empty (LO must be < HI)")
    return spec


def check_chain(specs: list[ExpertSpec], num_train_timesteps: int) -> list[ExpertSpec]:
    """Experts sorted by range; refuses overlaps, gaps between experts and ranges off the schedule."""
    chain = sorted(specs, key=lambda s: s.t_min)
    for s in chain:
        if s.t_max > num_train_timesteps:
            raise ConfigError(f"--expert {s.label}: the schedule has timesteps 0-{num_train_timesteps - 1}; "
                              f"HI may be at most {num_train_timesteps}")
    for a, b in zip(chain, chain[1:]):
        if b.t_min < a.t_max:
            raise ConfigError(f"--expert {a.label} and {b.label} overlap on {b.t_min}-{min(a.t_max, b.t_max)}: "
                              "each timestep needs one owner")
        if b.t_min > a.t_max:
            raise ConfigError(f"--expert {a.label} and {b.label} leave {a.t_max}-{b.t_min} to no expert: "
                              "give a contiguous chain (the base model runs only outside it)")
    return chain


def check_compatible(name: str, base_unet, unet, base_sched_cfg, sched_cfg) -> None:
    """An expert must be the base's architecture and share its noise schedule."""
    for k in SHAPE_KEYS:
        a, b = base_unet.config.get(k), unet.config.get(k)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise ConfigError(f"--expert {name}: UNet {k} is {b!r}, the base model's is {a!r} "
                              "(experts must share the base's architecture)")
    for k in NOISE_KEYS:
        if base_sched_cfg.get(k) != sched_cfg.get(k):
            raise ConfigError(f"--expert {name}: scheduler {k} is {sched_cfg.get(k)!r}, the base model's is "
                              f"{base_sched_cfg.get(k)!r} (a timestep would mean another noise level)")


class TimestepExperts(torch.nn.Module):
    """A UNet stand-in: ``forward(x, t, ...)`` runs each sample through the owner of its timestep."""

    def __init__(self, base, experts: list[tuple[ExpertSpec, torch.nn.Module]]):
        super().__init__()
        self.base = base
        self.experts = torch.nn.ModuleList([u for _, u in experts])
        self.specs = [s for s, _ in experts]
        self.calls: dict[str, int] = {}  # owner label -> samples it denoised (what ran where)

    # what the pipeline and the samplers read from a UNet
    config = property(lambda self: self.base.config)
    dtype = property(lambda self: self.base.dtype)
    device = property(lambda self: self.base.device)

    def owner(self, t: int) -> int:
        """Index into ``experts`` of the owner of timestep ``t``, or -1 for the base model."""
        for i, s in enumerate(self.specs):
            if s.t_min <= t < s.t_max:
                return i
        return -1

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        kwargs.pop("return_dict", None)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        owners = torch.tensor([self.owner(int(v)) for v in t.tolist()], device=sample.device)
        out = torch.empty_like(sample)
        for o in owners.unique().tolist():
            m = owners == o
            net = self.base if o < 0 else self.experts[o]
            label = "base" if o < 0 else self.specs[o].label
            self.calls[label] = self.calls.get(label, 0) + int(m.sum())
            out[m] = net(sample[m], t[m], encoder_hidden_states=encoder_hidden_states[m], **kwargs).sample
        return SimpleNamespace(sample=out)


def attach_experts(pipe, specs: list[ExpertSpec], *, device=None, dtype=None, allow_pickle: bool = False) -> TimestepExperts:
    """Load each expert's UNet (checked against ``pipe``'s), and put the router in ``pipe.unet``."""
    from harness.generate.pipes import load

    n_train = int(pipe.scheduler.config.num_train_timesteps)
    chain = check_chain(specs, n_train)
    loaded = []
    for s in chain:
        other = load(s.source, device=device or str(pipe.unet.device), dtype=dtype or pipe.unet.dtype,
                     allow_pickle=allow_pickle)
        check_compatible(s.label, pipe.unet, other.unet, pipe.scheduler.config, other.scheduler.config)
        loaded.append((s, other.unet))
        log.info("expert %s: owns timesteps %d <= t < %d", s.source, s.t_min, s.t_max)
    router = TimestepExperts(pipe.unet, loaded)
    pipe.unet = router
    return router
