"""Scheduler registry: short names (as users know them from A1111/ComfyUI) -> diffusers schedulers.

Every scheduler is built from the checkpoint's own scheduler config, so the noise schedule (betas,
steps_offset, prediction type) stays the model's; only the sampling algorithm changes.
"""

from __future__ import annotations

import difflib
import inspect

from harness.errors import ConfigError

# name -> (diffusers class name, extra config). The extra config is what separates e.g. dpm++ from
# dpm++_karras; it is applied on top of the checkpoint's config.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}

ALIASES: dict[str, str] = {
    "dpmpp": "dpm++", "dpm++_2m": "dpm++", "dpmpp_2m": "dpm++", "dpmsolver": "dpm++", "dpm": "dpm++",
    "dpm++_2m_karras": "dpm++_karras", "dpmpp_karras": "dpm++_karras", "dpmpp_sde": "dpm++_sde",
    "euler_ancestral": "euler_a", "euler-a": "euler_a", "k_euler": "euler", "k_euler_a": "euler_a",
    "plms": "pndm", "k_lms": "lms", "uni_pc": "unipc",
}
# Also accept diffusers class names, e.g. "DDIMScheduler".
_CLASS_NAMES = {cls.lower(): name for name, (cls, extra) in SCHEDULERS.items() if not extra}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def canonical_scheduler(name: str) -> str:
    """The registry name for ``name`` (case-insensitive, aliases and diffusers class names allowed)."""
    key = str(name).strip().lower().replace(" ", "_")
    if key in SCHEDULERS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    if key in _CLASS_NAMES:
        return _CLASS_NAMES[key]
    close = difflib.get_close_matches(key, [*SCHEDULERS, *ALIASES], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"scheduler {name!r} is not known{hint}; known schedulers: {', '.join(SCHEDULERS)}")


def _diffusers_scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and cls is not diffusers.SchedulerMixin:
        return cls
    return None


def make_scheduler(name: str, config: dict):
    """A fresh scheduler of kind ``name`` (registry name, alias, or any diffusers scheduler class name)
    built from a checkpoint's scheduler ``config``."""
    import diffusers

    cls = _diffusers_scheduler_class(name)
    if cls is not None and cls.__name__.lower() not in _CLASS_NAMES:
        extra = {}
    else:
        cls_name, extra = SCHEDULERS[canonical_scheduler(name)]
        cls = getattr(diffusers, cls_name)
    cfg = {**dict(config), **extra}
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        # DDIM/DDPM default to (and SD's DDPM configs carry) clip_sample=True, which clips the x0
        # estimate to +-1 and wrecks samples: SD latents are not bounded by 1.
        cfg["clip_sample"] = False
    return cls.from_config(cfg)


def scheduler_name_of(scheduler) -> str:
    """Best-effort registry name of an existing scheduler instance (its class name if unregistered)."""
    cls = type(scheduler).__name__
    # Entries with extra config first: a karras DPM++ is "dpm++_karras", not "dpm++".
    for name, (cls_name, extra) in sorted(SCHEDULERS.items(), key=lambda kv: not kv[1][1]):
        if cls_name == cls and all(scheduler.config.get(k) == v for k, v in extra.items()):
            return name
    return cls
