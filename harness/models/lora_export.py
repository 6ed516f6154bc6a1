"""Writing a trained LoRA as the two files its users load: diffusers' ``pytorch_lora_weights.safetensors``
(with the adapter metadata that carries alpha) and a kohya file for A1111 and ComfyUI (``.alpha`` keys,
sd-scripts' ``ss_*`` metadata). Both hold the same matrices; every loader fuses ``up @ down * alpha / rank``."""

from __future__ import annotations

import logging
from pathlib import Path

from harness.errors import CheckpointError
from harness.io import atomic_dir
from harness.models import lora_format as lf

log = logging.getLogger(__name__)


def _adapter_metadata(config: dict) -> dict:
    # peft's config holds sets (target_modules); diffusers writes its metadata as JSON
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _add_metadata(path: Path, extra: dict[str, str]) -> None:
    from safetensors.torch import load_file, save_file

    from harness.models.safety import read_safetensors_header

    meta = {**read_safetensors_header(path).metadata, **extra}
    save_file(load_file(str(path)), str(path), metadata=meta)


def write_lora(out_dir, components: dict[str, tuple[dict, dict]], *, kohya_file: str,
               metadata: dict[str, str] | None = None, kohya_metadata: dict[str, str] | None = None) -> Path:
    """``out_dir/`` with both files. ``components``: ``{"unet"|"text_encoder": (peft state dict, peft config
    dict)}`` as ``get_peft_model_state_dict`` / ``peft_config["default"].to_dict()`` give them. ``metadata``
    goes into both files, ``kohya_metadata`` (``ss_*``) into the kohya one. Written atomically, replacing
    ``out_dir`` (the run's own output)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    if kohya_file == lf.DIFFUSERS_FILE or not kohya_file.endswith(".safetensors"):
        raise CheckpointError(f"kohya LoRA file name {kohya_file!r}: expected NAME.safetensors, not {lf.DIFFUSERS_FILE}")
    unknown = set(components) - set(lf.COMPONENTS)
    if unknown:
        raise CheckpointError(f"LoRA components {sorted(unknown)}: expected {', '.join(lf.COMPONENTS)}")
    kw = {}
    for comp, (state, config) in components.items():
        # peft's own key names (lora_A / lora_B): diffusers' older spelling (convert_state_dict_to_diffusers)
        # does not survive its own loader for resnet and feed-forward layers
        kw[f"{comp}_lora_layers"] = state
        kw[f"{comp}_lora_adapter_metadata"] = _adapter_metadata(config)
    kohya = lf.to_kohya({c: lf.layers(s) for c, (s, _) in components.items()},
                        lambda c, m, r: lf.peft_alpha(components[c][1], m, r))
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        StableDiffusionPipeline.save_lora_weights(str(tmp), safe_serialization=True, **kw)
        if metadata:
            _add_metadata(tmp / lf.DIFFUSERS_FILE, metadata)
        save_file(kohya, str(tmp / kohya_file), metadata={"format": "pt", **metadata,
                                                          **{k: str(v) for k, v in (kohya_metadata or {}).items()}})
    log.info("wrote %s (%s and %s, %d LoRA layers)", out_dir, lf.DIFFUSERS_FILE, kohya_file, len(kohya) // 3)
    return Path(out_dir)


def check_kohya_file(path, pipe) -> int:
    """Every layer of the kohya file at ``path`` patches a weight of ``pipe``'s single-file layout with the
    right shape (A1111 and ComfyUI skip a key they cannot place without a word); the number of layers."""
    from safetensors.torch import load_file

    return lf.check_kohya(load_file(str(path)), pipe, path)
