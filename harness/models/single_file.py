"""The original LDM / A1111 single-file layout <-> diffusers components.

One ``.safetensors`` holds the whole pipeline under three prefixes: ``model.diffusion_model.*``
(UNet), ``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.*`` (CLIP text encoder).
LDM -> diffusers uses diffusers' maintained converters; diffusers -> LDM (for export, so A1111 and
ComfyUI users can load a fine-tune) is the inverse renaming, built here from the UNet/VAE configs.

Configs: SD 1.5's ship with the package (``configs/sd15``), so conversion needs no network. Files the
harness exports also carry their resolved diffusers configs in the safetensors ``__metadata__``, which
is how non-SD-1.5 sizes (the tiny zoo) load back.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from harness.errors import CheckpointError

log = logging.getLogger(__name__)

SD15_DIR = Path(__file__).parent / "configs" / "sd15"
TOKENIZER_DIR = Path(__file__).parent / "configs" / "clip-tokenizer"
PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
CONFIG_KEY = "harness.configs"  # __metadata__ key holding JSON {"unet": {...}, "vae": ..., "text_encoder": ..., "scheduler": ...}
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
_CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                 "scheduler": "scheduler/scheduler_config.json"}
_OTHER_LAYOUTS = {
    "cond_stage_model.model.": "an SD 2.x checkpoint (OpenCLIP text encoder)",
    "conditioner.embedders.": "an SDXL checkpoint",
    "down_blocks.": "a diffusers-format UNet weights file, not a whole-pipeline single file",
    "encoder.down_blocks.": "a diffusers-format VAE weights file, not a whole-pipeline single file",
}


def sd15_configs() -> dict[str, dict]:
    """The SD 1.5 diffusers configs shipped with the package: {"unet", "vae", "text_encoder", "scheduler"}."""
    return {name: json.loads((SD15_DIR / rel).read_text()) for name, rel in _CONFIG_FILES.items()}


def pipeline_configs(pipe) -> dict[str, dict]:
    """The resolved configs of a pipeline's components, in the form :func:`sd15_configs` returns."""
    text = pipe.text_encoder.config.to_diff_dict()
    return {
        "unet": _plain(dict(pipe.unet.config)),
        "vae": _plain(dict(pipe.vae.config)),
        "text_encoder": {k: v for k, v in text.items() if k not in ("transformers_version", "dtype", "torch_dtype")},
        "scheduler": _plain(dict(pipe.scheduler.config)),
    }


def _plain(cfg: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"},
                                 default=list))


def check_ldm_layout(keys, path) -> None:
    """Raise a one-line error unless ``keys`` hold all three SD components in the LDM layout."""
    keys = list(keys)
    missing = [c for c, p in PREFIX.items() if not any(k.startswith(p) for k in keys)]
    if not missing:
        return
    for prefix, what in _OTHER_LAYOUTS.items():
        if any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{path}: looks like {what}; expected an SD 1.x single file with "
                                  f"{', '.join(p + '*' for p in PREFIX.values())} keys")
    sample = ", ".join(keys[:3]) or "no tensors"
    raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint: no {', '.join(PREFIX[c] + '*' for c in missing)} "
                          f"keys (found e.g. {sample}); expected the LDM/A1111 single-file layout")


def configs_from_metadata(metadata: dict[str, str], path) -> dict[str, dict] | None:
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: __metadata__[{CONFIG_KEY!r}] is not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(c), dict) for c in COMPONENTS):
        raise CheckpointError(f"{path}: __metadata__[{CONFIG_KEY!r}] must hold objects for {', '.join(COMPONENTS)}")
    return cfg


# ---------------------------------------------------------------- LDM -> diffusers (diffusers' converters)

def ldm_to_diffusers(state: dict, configs: dict[str, dict]) -> dict[str, dict]:
    """Split an LDM single-file state dict into diffusers state dicts per component."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    text = convert_ldm_clip_checkpoint(state)
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); the LDM layout keeps it.
    text = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
    return {
        "unet": convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(state, configs["vae"]),
        "text_encoder": text,
    }


def build_pipeline(parts: dict[str, dict], configs: dict[str, dict], torch_dtype, path):
    """A ``StableDiffusionPipeline`` whose weights are exactly ``parts`` (strict: every weight present)."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models.tokenizer import clip_tokenizer

    def strip(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    # Parameters start on the meta device and are replaced by the file's tensors (assign=True), so a
    # full-size model is never randomly initialised only to be overwritten.
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(strip(configs["unet"])),
            "vae": AutoencoderKL.from_config(strip(configs["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**strip(configs["text_encoder"]))),
        }
    for name, model in models.items():
        state = parts[name]
        if torch_dtype is not None:
            state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        _load_strict(model, state, name, path)
        model.eval()
    sched_cfg = dict(configs["scheduler"])
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "PNDMScheduler"), None)
    if sched_cls is None or not issubclass(sched_cls, diffusers.SchedulerMixin):
        raise CheckpointError(f"{path}: unknown scheduler class {sched_cfg.get('_class_name')!r} in its config")
    return StableDiffusionPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=clip_tokenizer(), unet=models["unet"],
        scheduler=sched_cls.from_config(sched_cfg), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _load_strict(model, state: dict, name: str, path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path}: the {name} weights lack {len(missing)} of {len(expected)} tensors "
                              f"(e.g. {PREFIX[name]}... {missing[0]}); the checkpoint does not match the {name} config")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {name} tensor {k} has shape {tuple(state[k].shape)}, the config expects "
                                  f"{tuple(v.shape)}; not an SD 1.5-shaped checkpoint (or wrong config)")
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: {name} parameter {still_meta[0]} was not loaded")


# ---------------------------------------------------------------- diffusers -> LDM (export)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefix_map(cfg: dict) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, LDM prefix, inner renames) for every block of an SD-shaped UNet config."""
    n = cfg["layers_per_block"]
    nb = len(cfg["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    for b in range(nb):
        for j in range(n):  # LDM input block = [ResBlock, SpatialTransformer?]
            i = 1 + b * (n + 1) + j
            pairs += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", _UNET_RESNET),
                      (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", {})]
        if b < nb - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (n + 1)}.0.op.", {}))
        for j in range(n + 1):  # LDM output block = [ResBlock, SpatialTransformer?, Upsample?]
            i = b * (n + 1) + j
            pairs += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0.", _UNET_RESNET),
                      (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.", {})]
        if b < nb - 1:
            slot = 2 if cfg["up_block_types"][b].startswith("CrossAttn") else 1
            pairs.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{b * (n + 1) + n}.{slot}.conv.", {}))
    return pairs


def vae_prefix_map(cfg: dict) -> list[tuple[str, str, dict]]:
    nb = len(cfg["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out.", {}), ("decoder.conv_norm_out.", "decoder.norm_out.", {})]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", _VAE_RESNET) for k in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN))
    n = cfg["layers_per_block"]
    for i in range(nb):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
                  for j in range(n)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}))
        # LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{nb - 1 - i}.block.{j}.", _VAE_RESNET)
                  for j in range(n + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{nb - 1 - i}.upsample.", {}))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str, dict]], component: str) -> str:
    best = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    if best is None:
        if component == "vae":
            return key  # conv_in, conv_out, quant_conv, post_quant_conv: the same name in both layouts
        raise CheckpointError(f"{component} weight {key!r} has no place in the LDM layout (not an SD-shaped UNet)")
    src, dst, inner = best
    rest = key[len(src):]
    for a, b in sorted(inner.items(), key=lambda kv: -len(kv[0])):
        if rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return dst + rest


def unet_ldm_name(key: str, pairs: list[tuple[str, str, dict]]) -> str:
    """A diffusers UNet weight's single-file name (``pairs`` from :func:`unet_prefix_map`)."""
    return PREFIX["unet"] + _rename(key, pairs, "unet")


def text_encoder_ldm_name(key: str) -> str:
    """A CLIP text-encoder weight's single-file name (with or without transformers' ``text_model.`` level)."""
    return PREFIX["text_encoder"] + "text_model." + key.removeprefix("text_model.")


def diffusers_to_ldm(pipe) -> dict:
    """The pipeline's weights under their original LDM / A1111 single-file names."""
    import torch

    out: dict[str, torch.Tensor] = {}

    def put(name: str, v: torch.Tensor) -> None:
        if name in out:
            raise CheckpointError(f"two weights map to the LDM name {name!r}; the pipeline is not SD-shaped")
        out[name] = v

    adapters = [k for k in pipe.unet.state_dict() if ".lora_" in k or ".base_layer." in k]
    if adapters or any(".lora_" in k for k in pipe.text_encoder.state_dict()):
        raise CheckpointError("the pipeline has unfused LoRA adapters (e.g. "
                              f"{(adapters or ['text_encoder'])[0]}); fuse them first: pipe.fuse_lora(); "
                              "pipe.unload_lora_weights()")
    unet_pairs = unet_prefix_map(dict(pipe.unet.config))
    for k, v in pipe.unet.state_dict().items():
        put(unet_ldm_name(k, unet_pairs), v)
    vae_pairs = vae_prefix_map(dict(pipe.vae.config))
    for k, v in pipe.vae.state_dict().items():
        name = _rename(k, vae_pairs, "vae")
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # LDM's VAE attention uses 1x1 convolutions
        put(PREFIX["vae"] + name, v)
    for k, v in pipe.text_encoder.state_dict().items():
        put(text_encoder_ldm_name(k), v)
    n_pos = pipe.text_encoder.config.max_position_embeddings
    # The original CLIP checkpoints carry position_ids; A1111 and ComfyUI expect the key.
    out.setdefault(PREFIX["text_encoder"] + "text_model.embeddings.position_ids", torch.arange(n_pos)[None])
    return out


def write_config_folder(out_dir: str | Path, configs: dict[str, dict] | None = None) -> Path:
    """A diffusers config-only folder (model_index, component configs, tokenizer): what
    ``StableDiffusionPipeline.from_single_file(path, config=DIR)`` needs to work offline."""
    configs = configs or sd15_configs()
    out = Path(out_dir)
    index = json.loads((SD15_DIR / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", configs["scheduler"].get("_class_name", "PNDMScheduler")]
    files = {"model_index.json": index, **{rel: configs[c] for c, rel in _CONFIG_FILES.items()}}
    for rel, obj in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(obj, indent=2))
    text = dict(configs["text_encoder"])
    text.setdefault("model_type", "clip_text_model")
    text.setdefault("architectures", ["CLIPTextModel"])
    (out / _CONFIG_FILES["text_encoder"]).write_text(json.dumps(text, indent=2))
    shutil.copytree(TOKENIZER_DIR, out / "tokenizer", dirs_exist_ok=True)
    return out
