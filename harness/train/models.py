"""The models a run trains: the base pipeline loaded and made trainable (full or LoRA), the resume
fingerprint of what is trained, and the trained weights gathered whole for export."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from harness.errors import ConfigError
from harness.train.accel import full_state, is_sharded
from harness.train.pipeline import check_architecture, load_base
from harness.train.recipe import Recipe

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    pipe: object  # the base pipeline; its vae / tokenizer / scheduler are shared
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str
    scaling_factor: float
    weight_dtype: torch.dtype
    input_dtype: torch.dtype | None = None  # DeepSpeed casts the UNet itself and autocasts nothing
    clip_skip: int | None = None  # train.clip_skip: which text-encoder layer conditions the UNet


def build_models(recipe: Recipe, device: torch.device) -> Models:
    from diffusers import DDPMScheduler

    pipe = load_base(recipe.model.source, allow_pickle=recipe.model.allow_pickle)
    check_architecture(pipe, recipe.model.source)
    layers = pipe.text_encoder.config.num_hidden_layers
    if recipe.train.clip_skip and recipe.train.clip_skip > layers:
        raise ConfigError(f"key 'train.clip_skip' = {recipe.train.clip_skip}: {recipe.model.source}'s text encoder "
                          f"has {layers} layers; expected 1..{layers}")
    pred = recipe.model.prediction_type or pipe.scheduler.config.get("prediction_type", "epsilon")
    if pred != pipe.scheduler.config.get("prediction_type"):
        # The exported model must sample with what it was trained to predict.
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=pred)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    wd = WEIGHT_DTYPES[recipe.train.mixed_precision]
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    vae.requires_grad_(False).eval()
    te.requires_grad_(False).eval()
    if recipe.lora.enabled:
        add_lora(unet, te, recipe)
    else:
        unet.requires_grad_(True)
    unet.train()
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if recipe.lora.text_encoder:
            te.gradient_checkpointing_enable()
    vae.to(device, dtype=wd)
    te.to(device, dtype=torch.float32 if recipe.lora.text_encoder else wd)
    unet.to(device)
    if recipe.lora.enabled and wd != torch.float32:
        unet.to(dtype=wd)  # frozen base weights in low precision; trainable LoRA weights stay fp32
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return Models(pipe=pipe, unet=unet, text_encoder=te, alphas_cumprod=noise_scheduler.alphas_cumprod.clone(),
                  num_train_timesteps=noise_scheduler.config.num_train_timesteps, prediction_type=pred,
                  scaling_factor=float(vae.config.scaling_factor), weight_dtype=wd, clip_skip=recipe.train.clip_skip)


def add_lora(unet, text_encoder, recipe: Recipe) -> None:
    from peft import LoraConfig

    c = recipe.lora
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, init_lora_weights="gaussian",
                                target_modules=list(c.unet_targets)))
    if c.text_encoder:
        from peft import inject_adapter_in_model

        # peft directly, not transformers' text_encoder.add_adapter: transformers 5 refuses peft < 0.22 there,
        # and this is the call it wraps. The adapter is peft's "default", as diffusers' LoRA saving expects.
        text_encoder.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                           init_lora_weights="gaussian", target_modules=list(c.text_encoder_targets)),
                                text_encoder)


def fingerprint(models: Models, recipe: Recipe, shards: int | None = None, engine: str | None = None) -> dict:
    """What a checkpoint must share with this run to be resumable into it (under FSDP2, the number of
    processes when parameters are sharded: each holds its own EMA shard; under DeepSpeed, the engine: its checkpoints are its own)."""
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    trainable = [(n, tuple(p.shape)) for m in (models.unet, models.text_encoder)
                 for n, p in m.named_parameters() if p.requires_grad]
    fp = {"unet_config": digest(dict(models.unet.config)), "trainable": digest(trainable),
          "ema": recipe.ema.enabled, "prediction_type": models.prediction_type}
    if shards is not None:  # only then: unsharded checkpoints written before these keys stay resumable
        fp["shards"] = shards
    if engine is not None:
        fp["engine"] = engine
    return fp


def whole_models(recipe: Recipe, acc, models: Models, raw_unet, raw_te):
    """The trained UNet and text encoder with all their weights, on the main process (called on every
    process). Unsharded runs already hold them; under FSDP2 / ZeRO-3 the full state is gathered from the
    shards and loaded into a fresh unsharded copy of the base model (with the LoRA layers, for LoRA runs)."""
    if not is_sharded(acc):
        return raw_unet, raw_te
    unet_state = full_state(acc, raw_unet)
    te_trained = any(p.requires_grad for p in raw_te.parameters())
    te_state = full_state(acc, raw_te) if te_trained else None
    if not acc.is_main_process:
        return None, None
    pipe = load_base(recipe.model.source, allow_pickle=recipe.model.allow_pickle)
    if recipe.lora.enabled:
        add_lora(pipe.unet, pipe.text_encoder, recipe)
    pipe.unet.load_state_dict(unet_state)
    if te_state is None:
        return pipe.unet, raw_te
    pipe.text_encoder.load_state_dict(te_state)
    return pipe.unet, pipe.text_encoder


def named_parameters(unet, text_encoder) -> list[tuple[str, torch.nn.Parameter]]:
    """Both models' parameters under one namespace (``unet.*``, ``te.*``): the names EMA and the best
    weights are stored under."""
    return [(f"unet.{n}", p) for n, p in unet.named_parameters()] + [
        (f"te.{n}", p) for n, p in text_encoder.named_parameters()]
