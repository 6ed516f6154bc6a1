"""Loading the base model and writing the fine-tune (through :mod:`harness.models.load` / ``export``:
hub ids, diffusers folders, single files, pickle refusal), plus LoRA save and merge."""

from __future__ import annotations

import logging
from pathlib import Path

from harness.errors import CheckpointError
from harness.io import atomic_dir

log = logging.getLogger(__name__)


def load_base(source: str, *, allow_pickle: bool = False):
    """The base ``StableDiffusionPipeline`` in fp32 on the CPU (the loop moves and casts parts)."""
    from harness.models.load import load_pipeline

    return load_pipeline(source, dtype="fp32", device="cpu", allow_pickle=allow_pickle)


def check_architecture(pipe, source: str) -> None:
    """Refuse models this trainer cannot train correctly (SDXL, SD 2 with another text width, ...)."""
    unet, vae, te = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    problems = []
    if unet.get("addition_embed_type"):
        problems.append(f"its UNet has addition_embed_type={unet['addition_embed_type']!r} (SDXL-style)")
    if unet.in_channels != vae.latent_channels:
        problems.append(f"UNet in_channels {unet.in_channels} != VAE latent_channels {vae.latent_channels}")
    if unet.cross_attention_dim != te.hidden_size:
        problems.append(f"UNet cross_attention_dim {unet.cross_attention_dim} != text encoder width {te.hidden_size}")
    if problems:
        raise CheckpointError(f"model.source = {source}: not an SD-1.5-shaped text-to-image model: "
                              + "; ".join(problems))


def export_pipeline(pipe, out_dir: str | Path, *, single_file: bool = True) -> Path:
    """``out_dir/`` as a diffusers folder and, optionally, ``out_dir.safetensors`` in the original
    single-file layout (configs embedded, so non-SD-1.5 sizes load back)."""
    from harness.models.export import export_diffusers, export_single_file

    out_dir = Path(out_dir)
    export_diffusers(pipe, out_dir, overwrite=True)
    if single_file:
        export_single_file(pipe, out_dir.with_suffix(".safetensors"), overwrite=True)
    log.info("wrote %s%s", out_dir, " and " + str(out_dir.with_suffix(".safetensors")) if single_file else "")
    return out_dir


def save_lora(unet, text_encoder, out_dir: str | Path) -> Path:
    """LoRA weights alone, as ``pytorch_lora_weights.safetensors`` that plain diffusers loads with
    ``pipe.load_lora_weights(out_dir)``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_layers = None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    with atomic_dir(out_dir, overwrite=True) as tmp:
        StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=unet_layers,
                                                  text_encoder_lora_layers=te_layers, safe_serialization=True)
    return Path(out_dir)


def merge_lora(source: str, lora_dir: str | Path, *, allow_pickle: bool = False):
    """A fresh base pipeline with the LoRA fused into its weights (what ``final/`` holds for LoRA runs)."""
    pipe = load_base(source, allow_pickle=allow_pickle)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe
