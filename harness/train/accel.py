"""The Accelerator a run trains with, and which of accelerate's distributed modes harness.train supports:
DDP, FSDP2 and DeepSpeed ZeRO-3 (sharded parameters: see :func:`is_sharded`), DeepSpeed ZeRO 1-2
(sharded optimizer state and gradients: see :func:`configure_deepspeed`); not Megatron."""

from __future__ import annotations

import contextlib
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
    trackers = available_trackers(list(recipe.logging.trackers))
    _forget_other_precision(recipe.train.mixed_precision)
    acc = Accelerator(cpu=cpu, mixed_precision=recipe.train.mixed_precision, log_with=trackers or None,
                      project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
    check_loss_scaling(acc)
    plugin = getattr(acc.state, "fsdp_plugin", None) if acc.distributed_type == "FSDP" else None
    check_distributed_type(acc.distributed_type, getattr(plugin, "fsdp_version", None))
    if (is_sharded(acc) or is_deepspeed(acc)) and recipe.lora.text_encoder:
        kind = "FSDP" if is_sharded(acc) else "DeepSpeed"
        raise ConfigError(f"key 'lora.text_encoder' = true: under {kind} accelerate prepares one model per run and "
                          f"this would train two (UNet and text encoder); set lora.text_encoder=false or use DDP")
    if is_deepspeed(acc):
        configure_deepspeed(acc, recipe)
    return acc


def check_loss_scaling(acc) -> None:
    """fp16 trains only with a gradient scaler (or DeepSpeed's own loss scaling). accelerate makes one
    only on accelerators: on the CPU it silently drops fp16 autocast and loss scaling while the frozen
    parts would still be cast to fp16, a run that is neither fp16 training nor correct fp32 training.
    Checked on what accelerate set up, not on a guess of the device."""
    if acc.mixed_precision == "fp16" and acc.scaler is None and not is_deepspeed(acc):
        raise ConfigError(f"key 'train.mixed_precision' = 'fp16': needs a GPU (accelerate runs fp16 autocast "
                          f"and loss scaling only on accelerators, and this run is on {acc.device.type!r}); "
                          f"use bf16 or no here")


def check_distributed_type(distributed_type, fsdp_version: int | None = None, env: dict | None = None) -> None:
    """FSDP1 and Megatron are refused up front, and so is a launch config asking for sharding that
    accelerate quietly dropped (it shards only on accelerators: on CPUs ``--use_fsdp`` gives plain
    processes that each hold everything)."""
    env = os.environ if env is None else env
    kind = str(getattr(distributed_type, "value", distributed_type)).upper()
    if kind == "MEGATRON_LM":
        raise ConfigError("accelerate config: distributed_type MEGATRON_LM is not supported by harness.train; use "
                          "FSDP (fsdp_version: 2), DeepSpeed or DDP")
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
    """FSDP2 and ZeRO-3: each process holds a shard of every trained parameter, so anything that runs the
    model or reads its weights (validation, export, EMA, the best weights) runs on every process."""
    if acc.distributed_type == "FSDP":
        return True
    return is_deepspeed(acc) and int(acc.state.deepspeed_plugin.deepspeed_config.get(
        "zero_optimization", {}).get("stage", 0)) == 3


def shard_rank(acc) -> int | None:
    """This process's index when parameters are sharded (it names the process's EMA / best-weights
    files), None otherwise."""
    return acc.process_index if is_sharded(acc) else None


def is_deepspeed(acc) -> bool:
    """DeepSpeed's engine steps the optimizer inside ``backward`` at the accumulation boundary it is told of,
    scales the loss by the accumulation itself and clips by its config."""
    return acc.distributed_type == "DEEPSPEED"


def configure_deepspeed(acc, recipe: Recipe) -> None:
    """Check the DeepSpeed config and fill its batch settings from the recipe, before any long work."""
    plugin = acc.state.deepspeed_plugin
    cfg = plugin.deepspeed_config
    for section, key in (("optimizer", "train.optimizer"), ("scheduler", "train.lr_scheduler")):
        if section in cfg:
            raise ConfigError(f"DeepSpeed config: has an '{section}' section; harness.train builds the {section} "
                              f"from the recipe ({key}): remove it")
    t = recipe.train
    # (config key, value, the recipe key it comes from): harness prepares no dataloader, so accelerate
    # cannot infer them, and the recipe is where a run's batch, accumulation and clipping are set
    from_recipe = (("train_micro_batch_size_per_gpu", t.batch_size, "train.batch_size"),
                   ("gradient_accumulation_steps", t.grad_accum, "train.grad_accum"),
                   ("gradient_clipping", float(t.max_grad_norm or 0.0), "train.max_grad_norm"),
                   ("train_batch_size", t.batch_size * t.grad_accum * acc.num_processes,
                    "train.batch_size x train.grad_accum x processes"))
    for key, value, source in from_recipe:
        have = cfg.get(key, "auto")
        if have != "auto" and float(have) != float(value) and acc.is_main_process:
            # accelerate's own config writes gradient_accumulation_steps: 1 whatever the run needs
            log.warning("DeepSpeed config %s = %s replaced by the recipe's %s (%s)", key, have, source, value)
        cfg[key] = value
    acc.gradient_accumulation_steps = t.grad_accum


def full_state(acc, module: torch.nn.Module) -> dict | None:
    """The whole state dict of a sharded module, on the main process (None elsewhere); called on every
    process, since gathering the shards takes all of them."""
    if acc.distributed_type == "FSDP":
        state = acc.get_state_dict(module)
        return state if acc.is_main_process else None
    import deepspeed

    # ZeRO-3: gather the partitions in place for the copy (accelerate's own gather wants the engine and a
    # config flag that would also change what the engine's checkpoints hold). Small parameters stay whole
    # on every process ("persistent") and a gather would read those copies as they are, not the
    # partitions that EMA or the best weights were just written into: release them first.
    params = list(module.parameters())
    params[0].partition(param_list=params)  # touches only the whole ones
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not acc.is_main_process:
            return None
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def no_zero3_init(acc):
    """A context in which loaded models stay whole: with a ZeRO-3 config active, transformers builds the
    models it loads already partitioned (zero.Init), but only the trained UNet is the engine's to
    partition; the frozen VAE and text encoder, the scorers and the export copies (some loaded on the
    main process alone) must stay whole. The whole run holds it.
    (accelerate's ``zero3_init_context_manager(enable=False)`` re-registers the same ZeRO-3 config.)"""
    if not is_deepspeed(acc):
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        registered = getattr(acc.state.deepspeed_plugin, "dschf", None)
        if registered is not None:
            set_hf_deepspeed_config(registered)


def reshard(acc, *modules: torch.nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state. A no-grad forward (validation, sampling) leaves the
    root module's parameters whole, and EMA and the best weights are kept per shard."""
    if acc.distributed_type != "FSDP":
        return
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
