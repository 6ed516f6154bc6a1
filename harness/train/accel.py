"""The Accelerator a run trains with, and which of accelerate's distributed modes harness.train supports:
DDP, FSDP2 (sharded: see :func:`is_sharded`), not DeepSpeed or Megatron."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.train.metrics_log import available_trackers
from harness.train.recipe import Recipe


def build_accelerator(recipe: Recipe, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = recipe.train.cpu or not torch.cuda.is_available()
    if cpu and recipe.train.mixed_precision == "fp16":
        # accelerate silently drops fp16 autocast and loss scaling on the CPU; the frozen parts would still
        # be cast to fp16 and the run would be neither fp16 training nor correct fp32 training.
        raise ConfigError("key 'train.mixed_precision' = 'fp16': needs a GPU (fp16 autocast and loss scaling "
                          "do not run on the CPU); use bf16 or no here")
    trackers = available_trackers(list(recipe.logging.trackers))
    _forget_other_precision(recipe.train.mixed_precision)
    acc = Accelerator(cpu=cpu, mixed_precision=recipe.train.mixed_precision, log_with=trackers or None,
                      project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
    plugin = getattr(acc.state, "fsdp_plugin", None) if acc.distributed_type == "FSDP" else None
    check_distributed_type(acc.distributed_type, getattr(plugin, "fsdp_version", None))
    if is_sharded(acc) and recipe.lora.text_encoder:
        raise ConfigError("key 'lora.text_encoder' = true: under FSDP accelerate shards one model per run and this "
                          "would train two (UNet and text encoder); set lora.text_encoder=false or use DDP")
    return acc


def check_distributed_type(distributed_type, fsdp_version: int | None = None, env: dict | None = None) -> None:
    """FSDP2 shards; DeepSpeed and Megatron are refused up front, and so is a launch config asking for
    sharding that accelerate quietly dropped (it shards only on accelerators: on CPUs ``--use_fsdp``
    gives plain processes that each hold everything)."""
    env = os.environ if env is None else env
    kind = str(getattr(distributed_type, "value", distributed_type)).upper()
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(f"accelerate config: distributed_type {kind} is not supported by harness.train (its "
                          f"engine owns the optimizer and checkpoints); use FSDP (fsdp_version: 2) or DDP")
    if kind == "FSDP" and fsdp_version != 2:
        raise ConfigError(f"accelerate config: fsdp_version {fsdp_version} is not supported by harness.train; "
                          f"set fsdp_version: 2 (per-parameter sharding, which LoRA's frozen base weights need)")
    for var, want in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if str(env.get(var, "false")).lower() == "true" and kind != want:
            raise ConfigError(f"accelerate config asks for {want} ({var}=true) but accelerate set up {kind}: it "
                              f"shards only on GPUs (and train.cpu=true or no CUDA device keeps this run on the "
                              f"CPU); drop the {want} config or run on GPUs")


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps its state per process and refuses a second Accelerator with another precision, so
    a second in-process run (a notebook, a test session) would fail; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def is_sharded(acc) -> bool:
    """FSDP2: each process holds a shard of every trained parameter, so anything that runs the model or
    reads its weights (validation, export, EMA, the best weights) runs on every process."""
    return acc.distributed_type == "FSDP"
