"""Exponential moving average of trainable weights, saved as its own safetensors file (no pickle)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def ema_decay(step: int, max_decay: float, update_after_step: int = 0) -> float:
    """The warm-up used by diffusers' EMAModel: (1 + n) / (10 + n), capped at ``max_decay``, so the
    average does not stay pinned to the random start of a short run."""
    n = step - update_after_step - 1
    if n <= 0:
        return 0.0
    return min(max_decay, (1 + n) / (10 + n))


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of a tensor: the local shard of a sharded parameter (FSDP2's ``DTensor``,
    DeepSpeed ZeRO-3's flat ``ds_tensor`` partition), the tensor itself otherwise. Detached; writing into
    it writes into the parameter."""
    partition = getattr(t, "ds_tensor", None)  # read before detach(), which drops the attribute
    if partition is not None:
        return partition.detach()
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Shadow copies of named parameters; ``update`` after each optimizer step. Under FSDP2 and ZeRO-3
    each process averages (and saves) only its own shard of every parameter."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float = 0.9999,
                 update_after_step: int = 0):
        self.decay, self.update_after_step = decay, update_after_step
        self.shadow = {n: local_shard(p).clone().float() for n, p in named_params if p.requires_grad}
        self.step = 0

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        self.step += 1
        d = ema_decay(self.step, self.decay, self.update_after_step)
        for name, p in named_params:
            if name in self.shadow:
                s = self.shadow[name]
                s.mul_(d).add_(local_shard(p).float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        for name, p in named_params:
            if name in self.shadow:
                local_shard(p).copy_(self.shadow[name].to(p.dtype))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.shadow.items()}
        save_file(tensors, str(path), metadata={"step": str(self.step), "decay": str(self.decay)})

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            missing = set(self.shadow) - set(f.keys())
            if missing:
                raise KeyError(f"{path}: EMA file lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
            for k in self.shadow:
                self.shadow[k] = f.get_tensor(k).float()
        self.step = int(meta.get("step", 0))
