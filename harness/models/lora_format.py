"""LoRA weight files in the three formats diffusers reads, and the kohya names A1111 and ComfyUI read.

- ``diffusers``: ``pytorch_lora_weights.safetensors`` (``unet.<module>.lora.down.weight`` ...); the rank and
  alpha are in ``__metadata__["lora_adapter_metadata"]`` (without it diffusers assumes alpha = rank).
- ``kohya`` (A1111, ComfyUI, sd-scripts): ``lora_unet_<module>`` / ``lora_te_text_model_<module>`` with the
  module's dots as underscores, ``.lora_down.weight`` / ``.lora_up.weight`` and a scalar ``.alpha``; the
  update is ``up @ down * alpha / rank``.
- ``peft``: a folder (or ``unet/`` and ``text_encoder/`` subfolders) with ``adapter_config.json`` and
  ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``), as ``PeftModel.save_pretrained``
  writes it. diffusers does not read its alpha, so :func:`peft_as_diffusers` folds it into the weights first.

Module names are diffusers' (sd-scripts trains SD 1.x on the diffusers UNet); the text encoder's keep the
``text_model.`` level that transformers >= 5.6 no longer has.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import CheckpointError
from harness.models import safety

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' __metadata__ key (diffusers.loaders.lora_base)
COMPONENTS = ("unet", "text_encoder")
# (down, up) spellings of one layer's two matrices, per format
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), (".lora_down.weight", ".lora_up.weight"),
          ("_lora.down.weight", "_lora.up.weight"))  # the last: diffusers' old attention-processor files


@dataclass(frozen=True)
class LoraFiles:
    """A LoRA on disk: its ``format`` and the weight file of each component it holds (one file may hold both)."""

    format: str  # "diffusers" | "kohya" | "peft"
    path: Path  # what the user named
    files: dict[str, Path] = field(default_factory=dict)  # "unet"/"text_encoder"/"all" -> weights file


def _keys_format(keys: list[str]) -> str | None:
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if keys and all(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any("lora" in k for k in keys):  # unet./text_encoder. keys, or older unprefixed spellings: diffusers decides
        return "diffusers"
    return None


def _header(path: Path):
    if safety.sniff(path) == "pickle" or path.suffix.lower() not in safety.SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"{path}: LoRA weights must be a .safetensors file (pickled LoRA files are not read)")
    return safety.read_safetensors_header(path)


def _peft_dir(folder: Path) -> dict[str, Path] | None:
    """component -> adapter_model.safetensors of a peft folder (the component told by its module names)."""
    if (folder / PEFT_CONFIG).is_file():
        weights = folder / PEFT_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{folder}: has {PEFT_CONFIG} but no {PEFT_WEIGHTS}; expected a peft adapter folder")
        keys = list(_header(weights).tensors)
        te = any(".encoder.layers." in k or k.startswith("base_model.model.text_model.") for k in keys)
        return {"text_encoder" if te else "unet": weights}
    subs = {c: folder / c for c in COMPONENTS if (folder / c / PEFT_CONFIG).is_file()}
    if not subs:
        return None
    return {c: next(iter(_peft_dir(d).values())) for c, d in subs.items()}


def find_lora(path) -> LoraFiles:
    """What LoRA ``path`` (a file or a folder) is; a one-line error when it is none of the formats."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: LoRA weights not found; expected a .safetensors file or a folder")
    if path.is_dir() and (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: a diffusers model folder, not LoRA weights (in BASE::LORA@SCALE the "
                              "LoRA file or folder comes after '::')")
    if path.is_dir():
        peft = _peft_dir(path)
        if peft:
            return LoraFiles("peft", path, peft)
        if (path / DIFFUSERS_FILE).is_file():
            path = path / DIFFUSERS_FILE
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(f"{path}: expected {DIFFUSERS_FILE}, one .safetensors LoRA file, or a peft "
                                      f"folder ({PEFT_CONFIG}); found {len(found)} .safetensors files")
            path = found[0]
    keys = list(_header(path).tensors)
    fmt = _keys_format(keys)
    if fmt == "peft":
        config = path.parent / PEFT_CONFIG
        if not config.is_file():
            raise CheckpointError(f"{path}: peft adapter weights without {config.name} beside them (it holds alpha)")
        return LoraFiles("peft", path, _peft_dir(path.parent))
    if fmt is None:
        sample = ", ".join(keys[:2]) or "no tensors"
        raise CheckpointError(f"{path}: not a LoRA file in a format diffusers reads (keys e.g. {sample}); expected "
                              "unet.*/text_encoder.* (diffusers), lora_unet_*/lora_te_* (kohya) or a peft folder")
    return LoraFiles(fmt, path, {"all": path})


def is_lora(path) -> bool:
    """Whether ``path`` is LoRA weights rather than a model (reads headers only)."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "model_index.json").is_file():
        return False
    try:
        find_lora(p)
    except CheckpointError:
        return False
    return True


# ---------------------------------------------------------------- names

def kohya_name(component: str, module: str) -> str:
    """The kohya/A1111 name of a diffusers module name (``down_blocks.0...to_q`` -> ``lora_unet_down_blocks_0..._to_q``)."""
    if component == "text_encoder":
        module = "text_model." + module.removeprefix("text_model.")
    return KOHYA_PREFIX[component] + module.replace(".", "_")


def layers(state: dict, prefix: str = "") -> dict[str, tuple]:
    """module -> (down, up) of a state dict in any of the formats' spellings (keys under ``prefix`` only)."""
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        for down, up in _PAIRS:
            if k.endswith(down):
                module = k[len(prefix): -len(down)]
                up_key = k[: -len(down)] + up
                if up_key not in state:
                    raise CheckpointError(f"LoRA weight {k} has no matching {up_key}")
                out[module] = (v, state[up_key])
    return out


def to_kohya(component_layers: dict[str, dict[str, tuple]], alpha_of) -> dict:
    """kohya weights of ``{component: {module: (down, up)}}``; ``alpha_of(component, module, rank)`` gives
    each layer's alpha (stored as ``.alpha``, so every loader scales by alpha / rank)."""
    import torch

    out, seen = {}, {}
    for comp, mods in component_layers.items():
        for module, (down, up) in mods.items():
            name = kohya_name(comp, module)
            if name in seen:  # dots and underscores both flatten to '_'
                raise CheckpointError(f"LoRA modules {seen[name]} and {module} have the same kohya name {name}")
            seen[name] = module
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha_of(comp, module, int(down.shape[0]))))
    return out


def kohya_ldm_targets(pipe) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every kohya name a LoRA of ``pipe`` can have -> (the LDM single-file weight it patches, its shape),
    through the renaming :func:`harness.models.single_file.diffusers_to_ldm` exports with."""
    from harness.models import single_file as sf

    pairs = sf.unet_prefix_map(dict(pipe.unet.config))
    out = {}
    for comp, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, param in model.named_parameters():
            if not name.endswith(".weight") or param.ndim < 2 or ".lora_" in name:
                continue
            module = name[: -len(".weight")].replace(".base_layer", "")
            ldm = sf.unet_ldm_name(f"{module}.weight", pairs) if comp == "unet" else sf.text_encoder_ldm_name(
                f"{module}.weight")
            out[kohya_name(comp, module)] = (ldm, tuple(param.shape))
    return out


def check_kohya(state: dict, pipe, where) -> int:
    """Raise unless every layer of kohya ``state`` patches an existing LDM weight of ``pipe`` with its shape
    (the check A1111 and ComfyUI make silently: an unmatched key is skipped, not reported). Returns the count."""
    targets = kohya_ldm_targets(pipe)
    n = 0
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        if name not in targets:
            raise CheckpointError(f"{where}: LoRA layer {name} matches no weight of the single-file layout")
        ldm, shape = targets[name]
        up = state[f"{name}.lora_up.weight"]
        if (int(up.shape[0]), int(down.shape[1])) != tuple(shape[:2]):
            raise CheckpointError(f"{where}: LoRA layer {name} is {tuple(up.shape[:1]) + tuple(down.shape[1:2])}, "
                                  f"the weight it patches ({ldm}) is {shape}")
        n += 1
    return n


# ---------------------------------------------------------------- alpha

def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module name ending in it (peft.tuners.tuners_utils)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_alpha(config: dict, module: str, rank: int) -> float:
    """The kohya alpha that gives peft's scale for ``module`` (rslora scales by alpha / sqrt(rank))."""
    if config.get("use_dora"):
        raise CheckpointError("a DoRA adapter (use_dora: true): its magnitude vectors have no kohya/diffusers "
                              "LoRA equivalent here")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def peft_as_diffusers(lora: LoraFiles) -> dict:
    """A peft folder's weights as a diffusers LoRA state dict that loads at peft's own scale: each
    layer's alpha / rank (or alpha / sqrt(rank), rslora) is folded into its up matrix, since diffusers
    reads no alpha from a dict and mis-keys per-layer alphas (peft's alpha_pattern) given as kohya ``.alpha``."""
    from safetensors.torch import load_file

    out = {}
    for comp, weights in lora.files.items():
        config = json.loads((weights.parent / PEFT_CONFIG).read_text(encoding="utf-8"))
        for module, (down, up) in layers(load_file(str(weights)), "base_model.model.").items():
            rank = int(down.shape[0])
            scale = peft_alpha(config, module, rank) / rank
            out[f"{comp}.{module}.lora_A.weight"] = down
            out[f"{comp}.{module}.lora_B.weight"] = up * scale
    return out
