"""What a LoRA file holds, from its headers and its few scalar tensors: format, rank, alpha, targets,
text encoder or not, and what it records about its training (base model, steps, resolution, recipe)."""

from __future__ import annotations

import json
import re

from harness.models import lora_format as lf
from harness.models import safety

# recorded facts, by the key each format writes them under (first found wins)
_FACTS = {
    "base_model": ("harness.base_model", "ss_sd_model_name"),
    "base_sha256": ("harness.base_sha256", "ss_new_sd_model_hash"),
    "steps": ("harness.steps", "ss_steps"),
    "resolution": ("harness.resolution", "ss_resolution"),
    "recipe_sha256": ("harness.recipe_sha256",),
    "trained_by": ("harness.trained_by",),
}


def _component(fmt: str, comp: str, key: str) -> str:
    if comp != "all":
        return comp
    if fmt == "kohya":
        return "unet" if key.startswith("lora_unet_") else "text_encoder"
    return "text_encoder" if key.startswith("text_encoder.") else "unet"  # unprefixed old files are the UNet's


_INNER = (r"(?:transformer_blocks|layers)[._]\d+[._](?:attn1|attn2|self_attn|mlp|ff)[._](.+)$",
          r"(?:resnets|attentions|downsamplers|upsamplers)[._]\d+[._](.+)$")


def _target(module: str) -> str:
    """A module's name inside its block (``to_q``, ``to_out.0``, ``q_proj``; kohya's with underscores, which
    cannot be told from dots): the peft target it came from."""
    for pat in _INNER:
        m = re.search(pat, module)
        if m:
            return m.group(1)
    return module.removeprefix("lora_unet_").removeprefix("lora_te_")


def _alphas(lora: lf.LoraFiles, meta: dict, comp_of) -> dict[str, set[float]]:
    """Alpha per component as the loaders will use it; missing means 'alpha = rank' (diffusers, kohya)."""
    from safetensors import safe_open

    out: dict[str, set[float]] = {}
    if lora.format == "kohya":
        with safe_open(str(lora.files["all"]), framework="pt") as f:
            for k in f.keys():
                if k.endswith(".alpha"):
                    out.setdefault(comp_of(k), set()).add(float(f.get_tensor(k).item()))
    elif lora.format == "diffusers" and lf.ADAPTER_METADATA in meta:
        packed = json.loads(meta[lf.ADAPTER_METADATA])
        for comp in lf.COMPONENTS:
            if f"{comp}.lora_alpha" in packed:
                out[comp] = {float(packed[f"{comp}.lora_alpha"]), *map(float, (packed.get(f"{comp}.alpha_pattern")
                                                                              or {}).values())}
    elif lora.format == "peft":
        for comp, w in lora.files.items():
            cfg = json.loads((w.parent / lf.PEFT_CONFIG).read_text(encoding="utf-8"))
            out[comp] = {float(cfg.get("lora_alpha", cfg.get("r", 8))), *map(float, (cfg.get("alpha_pattern")
                                                                                   or {}).values())}
    return out


def describe_lora(path) -> dict:
    """``harness info`` for a LoRA: what every loader of it needs to know, without loading a model."""
    lora = lf.find_lora(path)
    meta: dict[str, str] = {}
    found: dict[str, dict] = {}  # component -> {"ranks", "targets", "layers"}
    n_tensors, dtypes, size = 0, {}, 0
    for comp, file in lora.files.items():
        h = safety.read_safetensors_header(file)
        meta.update(h.metadata)
        n_tensors += len(h.tensors)
        size += file.stat().st_size
        for dt, n in h.dtypes().items():
            dtypes[dt] = dtypes.get(dt, 0) + n
        shapes = {k: _Shape(shape) for k, (_, shape) in h.tensors.items()}
        for module, (down, _up) in lf.layers(shapes, "base_model.model." if lora.format == "peft" else "").items():
            c = _component(lora.format, comp, module)
            if lora.format == "diffusers" and module.startswith(("unet.", "text_encoder.")):
                module = module.split(".", 1)[1]
            f = found.setdefault(c, {"ranks": set(), "targets": set(), "layers": 0})
            f["ranks"].add(int(down.shape[0]))
            f["targets"].add(_target(module))
            f["layers"] += 1
    alphas = _alphas(lora, meta, lambda k: _component(lora.format, "all", k))
    comps = {}
    for c in sorted(found):
        rank, a = _one(found[c]["ranks"]), alphas.get(c)
        alpha = _one(a) if a else rank  # what diffusers and kohya loaders assume when none is stored
        scale = alpha / rank if isinstance(rank, int) and isinstance(alpha, (int, float)) else None
        comps[c] = {"layers": found[c]["layers"], "rank": rank, "alpha": alpha, "alpha_recorded": bool(a),
                    "scale": scale, "targets": sorted(found[c]["targets"])}
    facts = {name: next((meta[k] for k in keys if meta.get(k)), None) for name, keys in _FACTS.items()}
    return {"source": str(path), "kind": "lora", "format": lora.format, "files": [str(f) for f in lora.files.values()],
            "components": comps, "text_encoder": "text_encoder" in comps, "unet": "unet" in comps,
            "tensors": n_tensors, "stored_dtypes": dtypes, "bytes_on_disk": size, **facts}


class _Shape:
    """A tensor stand-in with only a shape: ranks come from headers, no tensor is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _one(values: set):
    return next(iter(values)) if len(values) == 1 else sorted(values)
