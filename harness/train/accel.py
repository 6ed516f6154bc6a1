"""The Accelerator a run trains with, and which of accelerate's distributed modes harness.train supports:
DDP, FSDP2 (sharded parameters: see :func:`is_sharded`), DeepSpeed ZeRO stages 1-2 (sharded optimizer
state and gradients: see :func:`configure_deepspeed`); not ZeRO-3 or Megatron."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.train.metrics_log import available_trackers
from harness.train.recipe import Recipe

log = logging.getLogger(__name__)


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
    if (is_sharded(acc) or is_deepspeed(acc)) and recipe.lora.text_encoder:
        kind = "FSDP" if is_sharded(acc) else "DeepSpeed"
        raise ConfigError(f"key 'lora.text_encoder' = true: under {kind} accelerate prepares one model per run and "
                          f"this would train two (UNet and text encoder); set lora.text_encoder=false or use DDP")
    if is_deepspeed(acc):
        configure_deepspeed(acc, recipe)
    return acc


def check_distributed_type(distributed_type, fsdp_version: int | None = None, env: dict | None = None) -> None:
    """FSDP2 shards; DeepSpeed and Megatron are refused up front, and so is a launch config asking for
    sharding that accelerate quietly dropped (it shards only on accelerators: on CPUs ``--use_fsdp``
    gives plain processes that each hold everything)."""
    env = os.environ if env is None else env
    kind = str(getattr(distributed_type, "value", distributed_type)).upper()
    if kind == "MEGATRON_LM":
        raise ConfigError("accelerate config: distributed_type MEGATRON_LM is not supported by harness.train; use "
                          "FSDP (fsdp_version: 2), DeepSpeed (ZeRO stage 1-2) or DDP")
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


def is_deepspeed(acc) -> bool:
    """DeepSpeed's engine steps the optimizer inside ``backward`` at the accumulation boundary it is told of,
    scales the loss by the accumulation itself and clips by its config."""
    return acc.distributed_type == "DEEPSPEED"


# the recipe key each DeepSpeed batch setting comes from (harness prepares no dataloader, so accelerate
# cannot infer them, and the recipe is where a run's batch, accumulation and clipping are set)
DEEPSPEED_FROM_RECIPE = {"train_micro_batch_size_per_gpu": "train.batch_size",
                         "gradient_accumulation_steps": "train.grad_accum",
                         "gradient_clipping": "train.max_grad_norm",
                         "train_batch_size": "train.batch_size x train.grad_accum x processes"}


def configure_deepspeed(acc, recipe: Recipe) -> None:
    """Check the DeepSpeed config and fill its batch settings from the recipe, before any long work."""
    plugin = acc.state.deepspeed_plugin
    cfg = plugin.deepspeed_config
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage = {stage} is not supported by harness.train "
                          f"(validation, EMA and export read whole parameters); use stage 1 or 2, or FSDP "
                          f"(fsdp_version: 2) to shard parameters")
    for section, key in (("optimizer", "train.optimizer"), ("scheduler", "train.lr_scheduler")):
        if section in cfg:
            raise ConfigError(f"DeepSpeed config: has an '{section}' section; harness.train builds the {section} "
                              f"from the recipe ({key}): remove it")
    t = recipe.train
    want = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": float(t.max_grad_norm or 0.0),
            "train_batch_size": t.batch_size * t.grad_accum * acc.num_processes}
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have != "auto" and float(have) != float(value) and acc.is_main_process:
            # accelerate's own config writes gradient_accumulation_steps: 1 whatever the run needs
            log.warning("DeepSpeed config %s = %s replaced by the recipe's %s (%s)", key, have,
                        DEEPSPEED_FROM_RECIPE[key], value)
        cfg[key] = value
    acc.gradient_accumulation_steps = t.grad_accum
