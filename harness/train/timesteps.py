"""Which diffusion timesteps a step trains on: uniform over ``[t_min, t_max)``.

Restricting the range trains a specialist, e.g. a refiner for the late (noisy) steps 750-1000.
"""

from __future__ import annotations

import torch


def check_range(t_min: int, t_max: int, num_train_timesteps: int) -> None:
    if not 0 <= t_min < t_max <= num_train_timesteps:
        raise ValueError(f"timestep range [{t_min}, {t_max}): expected 0 <= t_min < t_max <= "
                         f"{num_train_timesteps} (the base model's num_train_timesteps)")


def sample_timesteps(n: int, t_min: int, t_max: int, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """``n`` integer timesteps drawn uniformly from ``[t_min, t_max)``."""
    return torch.randint(t_min, t_max, (n,), generator=generator, device=device, dtype=torch.long)


def evenly_spaced(t_min: int, t_max: int, n: int = 5) -> list[int]:
    """``n`` fixed timesteps spread over ``[t_min, t_max)`` (centres of equal bins), for validation."""
    width = (t_max - t_min) / n
    return sorted({int(t_min + width * (i + 0.5)) for i in range(n)})
