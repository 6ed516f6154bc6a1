"""Save a pipeline as a diffusers folder or as one ``.safetensors`` in the original LDM / A1111 layout.

The single file carries the resolved diffusers configs in its ``__metadata__``, so any size of SD-shaped
model (the tiny zoo included) loads back through :func:`harness.models.load.load_pipeline` exactly;
full-size SD 1.5 files also load in A1111, ComfyUI and diffusers' ``from_single_file``. Both writers
build under a temporary name and rename when complete, and never replace an existing output unless
``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from harness.errors import HarnessError
from harness.io import atomic_dir
from harness.models import single_file as sf
from harness.models.load import load_pipeline, parse_dtype

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "safetensors")


def _cast(state: dict, torch_dtype) -> dict:
    if torch_dtype is None:
        return {k: v.contiguous() for k, v in state.items()}
    return {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def ldm_state_dict(pipe, dtype=None) -> dict:
    """The pipeline's weights under LDM / A1111 names, floating tensors cast to ``dtype`` if given."""
    return _cast(sf.diffusers_to_ldm(pipe), parse_dtype(dtype))


def export_single_file(pipe, out_path, *, dtype=None, overwrite: bool = False, embed_configs: bool = True) -> Path:
    """Write ``out_path`` (``.safetensors``) in the original single-file layout; returns the path.

    ``dtype``: fp32/fp16/bf16 (None keeps the pipeline's). ``embed_configs`` stores the diffusers
    configs in ``__metadata__["harness.configs"]`` so non-SD-1.5 sizes load back."""
    from safetensors.torch import save_file

    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        raise HarnessError(f"{out}: a single-file export must end in .safetensors")
    if out.exists() and not overwrite:
        raise HarnessError(f"{out}: already exists; refusing to overwrite it (pass overwrite / --overwrite)")
    state = ldm_state_dict(pipe, dtype)
    metadata = {"format": "pt", "harness.layout": "ldm-sd1"}
    if embed_configs:
        metadata[sf.CONFIG_KEY] = json.dumps(sf.pipeline_configs(pipe), sort_keys=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise HarnessError(f"{out}: cannot write ({e.strerror or e}); the previous file, if any, is intact") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    log.info("wrote %s (%d tensors)", out, len(state))
    return out


def export_diffusers(pipe, out_dir, *, dtype=None, overwrite: bool = False) -> Path:
    """Write a diffusers folder (``save_pretrained``, safetensors weights); returns the folder."""
    from safetensors.torch import load_file, save_file

    from harness.models.safety import read_safetensors_header

    torch_dtype = parse_dtype(dtype)
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if torch_dtype is not None:
            # Cast the written files rather than the live pipeline, which stays as the caller had it.
            for f in sorted(tmp.rglob("*.safetensors")):
                meta = read_safetensors_header(f).metadata
                save_file(_cast(load_file(str(f)), torch_dtype), str(f), metadata=meta or None)
            _set_config_dtype(tmp / "text_encoder" / "config.json", torch_dtype)
    log.info("wrote %s", out)
    return out


def _set_config_dtype(path: Path, torch_dtype) -> None:
    if path.is_file():
        cfg = json.loads(path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = str(torch_dtype).removeprefix("torch.")
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def export(source, out, *, format: str | None = None, dtype=None, overwrite: bool = False,
           allow_pickle: bool = False, lora=None, lora_scale: float = 1.0) -> Path:
    """Load ``source`` (anything :func:`load_pipeline` takes, or a pipeline) and export it.

    ``format``: "diffusers" or "safetensors"; None picks "safetensors" when ``out`` ends in
    ``.safetensors``, else "diffusers". ``lora``: LoRA weights fused in before export."""
    out = Path(out)
    fmt = format or ("safetensors" if out.suffix.lower() == ".safetensors" else "diffusers")
    if fmt not in FORMATS:
        raise HarnessError(f"format {fmt!r} is unknown; expected one of {', '.join(FORMATS)}")
    parse_dtype(dtype)  # a bad dtype fails before a long load
    if out.exists() and not overwrite:
        raise HarnessError(f"{out}: already exists; refusing to overwrite it (pass overwrite / --overwrite)")
    if hasattr(source, "unet"):
        pipe = source
        if lora is not None:
            raise HarnessError("lora: pass LoRA weights to load_pipeline() when exporting a pipeline object")
    else:
        pipe = load_pipeline(source, dtype=None, allow_pickle=allow_pickle, lora=lora, lora_scale=lora_scale)
    if fmt == "safetensors":
        return export_single_file(pipe, out, dtype=dtype, overwrite=overwrite)
    return export_diffusers(pipe, out, dtype=dtype, overwrite=overwrite)
