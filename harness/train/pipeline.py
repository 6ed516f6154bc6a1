"""Loading the base model and writing the fine-tune (through :mod:`harness.models.load` / ``export``:
hub ids, diffusers folders, single files, pickle refusal), plus LoRA save and merge."""

from __future__ import annotations

import logging
from pathlib import Path

from harness.errors import CheckpointError

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


def export_pipeline(pipe, out_dir: str | Path, *, single_file: bool = True, single_file_dtype: str | None = None) -> Path:
    """``out_dir/`` as a diffusers folder (the weights as trained, fp32) and, optionally,
    ``out_dir.safetensors`` in the original single-file layout in ``single_file_dtype`` (configs embedded,
    so non-SD-1.5 sizes load back)."""
    from harness.models.export import export_diffusers, export_single_file

    out_dir = Path(out_dir)
    export_diffusers(pipe, out_dir, overwrite=True)
    if single_file:
        export_single_file(pipe, out_dir.with_suffix(".safetensors"), dtype=single_file_dtype, overwrite=True)
    log.info("wrote %s%s", out_dir, " and " + str(out_dir.with_suffix(".safetensors")) if single_file else "")
    return out_dir


def save_lora(unet, text_encoder, out_dir: str | Path, *, kohya_file: str, metadata: dict | None = None,
              kohya_metadata: dict | None = None) -> Path:
    """The LoRA weights alone: ``pytorch_lora_weights.safetensors`` that plain diffusers loads with
    ``pipe.load_lora_weights(out_dir)`` at the trained alpha / rank, and ``kohya_file`` for A1111 / ComfyUI."""
    from peft.utils import get_peft_model_state_dict

    from harness.models.lora_export import write_lora

    parts = {"unet": unet}
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        parts["text_encoder"] = text_encoder
    components = {name: (get_peft_model_state_dict(m), m.peft_config["default"].to_dict()) for name, m in parts.items()}
    return write_lora(out_dir, components, kohya_file=kohya_file, metadata=metadata, kohya_metadata=kohya_metadata)


def merge_lora(source: str, lora_dir: str | Path, *, allow_pickle: bool = False):
    """A fresh base pipeline with the LoRA fused into its weights (what ``final/`` holds for LoRA runs),
    through the loader every command uses."""
    from harness.models.load import attach_lora

    pipe = load_base(source, allow_pickle=allow_pickle)
    attach_lora(pipe, lora_dir, allow_pickle=allow_pickle)
    return pipe
