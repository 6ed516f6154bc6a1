"""One loader for every checkpoint a user may have: a hub id, a diffusers folder, or a single file.

``load_pipeline`` is what every command uses, so ``harness info``, training, generation and
evaluation all see a checkpoint the same way. Sources are told apart without guessing: an existing
path is always local; a missing path that looks like a path (``./x``, ``/x``, ``x.safetensors``) is a
'not found' error; ``owner/name`` that is not an existing path is a hub id (``hf:owner/name`` forces
the hub even when a folder of that name exists).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import CheckpointError, HarnessError
from harness.models import safety

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FILE_SUFFIXES = safety.SAFETENSORS_SUFFIXES + safety.PICKLE_SUFFIXES + (".json", ".yaml", ".yml", ".onnx", ".gguf")
KINDS = ("hub", "diffusers", "single_file", "pickle")


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint source: ``kind`` in :data:`KINDS`, ``ref`` a hub id or a local path."""

    kind: str
    ref: str

    @property
    def path(self) -> Path | None:
        return None if self.kind == "hub" else Path(self.ref)


def resolve_source(source: str | os.PathLike) -> Source:
    """Tell a hub id from a local path (see the module docstring); local files are typed by content."""
    text = os.fspath(source)
    if text.startswith("hf:"):
        repo = text[3:]
        if not _HUB_ID.match(repo):
            raise CheckpointError(f"{text}: expected hf:OWNER/NAME (a Hugging Face hub id)")
        return Source("hub", repo)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json); expected a folder "
                                  "with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/")
        return Source("diffusers", str(path))
    if path.is_file():
        return Source(_file_kind(path), str(path))
    if path.exists():
        raise CheckpointError(f"{path}: not a regular file or folder")
    if isinstance(source, os.PathLike) or not _HUB_ID.match(text) or text.lower().endswith(_FILE_SUFFIXES):
        raise CheckpointError(f"{text}: not found; expected an existing diffusers folder, a .safetensors file, "
                              "or a hub id like OWNER/NAME")
    return Source("hub", text)


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    try:
        sniffed = safety.sniff(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    if suffix in safety.SAFETENSORS_SUFFIXES:
        if sniffed == "pickle":
            raise safety.UnsafeCheckpointError(f"{path}: named .safetensors but holds a pickle; refusing to load it")
        return "single_file"  # validated (truncation, bad header) when read
    if suffix in safety.PICKLE_SUFFIXES:
        return "single_file" if sniffed == "safetensors" else "pickle"
    raise CheckpointError(f"{path}: unknown checkpoint file type {suffix or '(no suffix)'!r}; expected a diffusers "
                          "folder, a .safetensors single file, or a .ckpt/.pt (with allow_pickle)")


def parse_dtype(dtype):
    """``"fp32"|"fp16"|"bf16"`` (or a torch dtype, or None for 'as stored') -> torch dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise HarnessError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def load_pipeline(source, *, dtype="fp32", device=None, scheduler: str | None = None, lora=None,
                  lora_scale: float = 1.0, allow_pickle: bool = False, cache_dir=None):
    """Load an SD 1.x ``StableDiffusionPipeline`` from any supported source.

    ``dtype``: fp32/fp16/bf16 (None keeps the stored dtype for single files). ``device``: e.g. "cpu",
    "cuda:0". ``scheduler``: a short name from :data:`harness.models.schedulers.SCHEDULERS` or a diffusers scheduler class name.
    ``lora``: a LoRA file or folder, fused into the weights at ``lora_scale``; ``source`` may also be
    ``BASE::LORA@SCALE`` (:mod:`harness.models.lora_spec`). ``allow_pickle``: permit
    ``.ckpt``/``.pt``/``.bin`` weights (read with ``torch.load(weights_only=True)`` only).
    ``cache_dir``: the Hugging Face cache to use for hub ids (default: the usual one)."""
    from harness.models.lora_spec import is_spec, parse_spec

    if is_spec(source):  # BASE::LORA@SCALE
        spec = parse_spec(source)
        if lora is not None:
            raise HarnessError(f"{source}: names LoRA weights already; do not pass lora= (--lora) as well")
        source, lora, lora_scale = spec.base, spec.lora, spec.scale
    src = resolve_source(source)
    torch_dtype = parse_dtype(dtype)
    log.info("loading %s (%s)", src.ref, src.kind)
    if src.kind == "hub":
        pipe = _load_hub(src.ref, torch_dtype, allow_pickle, cache_dir)
    elif src.kind == "diffusers":
        pipe = _load_diffusers_dir(Path(src.ref), torch_dtype, allow_pickle)
    else:
        pipe = load_single_file(src.ref, dtype=torch_dtype, allow_pickle=allow_pickle)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    if lora is not None:
        attach_lora(pipe, lora, scale=lora_scale, allow_pickle=allow_pickle)
    if device is not None:
        _to_device(pipe, device)
    return pipe


def load_single_file(path, *, dtype=None, allow_pickle: bool = False):
    """An LDM/A1111 single file (``.safetensors``, or ``.ckpt`` with ``allow_pickle``) as a pipeline."""
    from harness.models import single_file as sf

    path = Path(path)
    if _file_kind(path) == "pickle":
        state, metadata = safety.load_pickled(path, allow_pickle=allow_pickle), {}
    else:
        header = safety.read_safetensors_header(path)
        sf.check_ldm_layout(header.tensors, path)  # before reading gigabytes of a file we cannot use
        state, metadata = safety.load_safetensors(path)
    sf.check_ldm_layout(state, path)
    configs = sf.configs_from_metadata(metadata, path) or sf.sd15_configs()
    parts = sf.ldm_to_diffusers(state, configs)
    del state
    return sf.build_pipeline(parts, configs, parse_dtype(dtype), path)


def _pretrained_kwargs(torch_dtype, allow_pickle: bool) -> dict:
    # use_safetensors=True makes diffusers/transformers fail rather than fall back to pickled .bin files.
    return dict(dtype=torch_dtype, use_safetensors=None if allow_pickle else True, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def _load_diffusers_dir(path: Path, torch_dtype, allow_pickle: bool):
    from diffusers import StableDiffusionPipeline

    safety.check_weight_files(path, allow_pickle=allow_pickle)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / part).is_dir():
            raise CheckpointError(f"{path}: diffusers folder has no {part}/ subfolder; expected an SD 1.x pipeline")
    try:
        return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                                       **_pretrained_kwargs(torch_dtype, allow_pickle))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot load the diffusers pipeline ({type(e).__name__}: "
                              f"{safety._first_line(e)[:200]})") from e


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


def _load_hub(repo: str, torch_dtype, allow_pickle: bool, cache_dir):
    from diffusers import StableDiffusionPipeline

    offline = hub_offline()
    try:
        return StableDiffusionPipeline.from_pretrained(repo, local_files_only=offline, cache_dir=cache_dir,
                                                       **_pretrained_kwargs(torch_dtype, allow_pickle))
    except Exception as e:  # hub client errors have no common base; each is turned into one line here
        if isinstance(e, HarnessError):
            raise
        if offline:
            raise CheckpointError(
                f"{repo}: hub id not in the local Hugging Face cache, and HF_HUB_OFFLINE is set so it cannot be "
                f"downloaded (no local path {repo!r} exists either); pass a local diffusers folder or .safetensors "
                "path, or download it on a connected machine") from e
        raise CheckpointError(f"{repo}: cannot load from the Hugging Face hub ({type(e).__name__}: "
                              f"{safety._first_line(e)[:160]}); check the id and the network, or pass a local "
                              "path") from e


def set_scheduler(pipe, name: str) -> None:
    """Replace the pipeline's scheduler, keeping its noise schedule (betas, timesteps, prediction type)."""
    from harness.models.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)


def attach_lora(pipe, lora, *, scale: float = 1.0, allow_pickle: bool = False) -> None:
    """Load LoRA weights (diffusers, kohya/A1111 or a peft folder: :mod:`harness.models.lora_format`) and fuse
    them into the base weights at ``scale`` (on top of each layer's alpha / rank)."""
    from harness.models import lora_format as lf

    path = Path(lora).expanduser()
    pickled_dir = path.is_dir() and not any(path.rglob("*.safetensors")) and any(
        f.suffix.lower() in safety.PICKLE_SUFFIXES for f in path.iterdir())
    if pickled_dir:
        safety.check_weight_files(path, allow_pickle=allow_pickle)  # refuses naming the pickled file
    if (path.is_file() and safety.sniff(path) == "pickle") or pickled_dir:
        if not allow_pickle:
            raise safety.UnsafeCheckpointError(f"{path}: refused: {safety.PICKLE_RISK}")
        load_from, kwargs = (str(path), {}) if pickled_dir else (str(path.parent), {"weight_name": path.name})
    else:
        found = lf.find_lora(path)
        if found.format == "peft":  # diffusers reads no peft folder's alpha: folded into the weights
            load_from, kwargs = lf.peft_as_diffusers(found), {}
        else:
            f = found.files["all"]
            load_from, kwargs = str(f.parent), {"weight_name": f.name}
    try:
        pipe.load_lora_weights(load_from, adapter_name="harness_lora", use_safetensors=None if allow_pickle else True,
                               local_files_only=True, **kwargs)
        pipe.fuse_lora(lora_scale=scale, adapter_names=["harness_lora"])
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter modules
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot attach these LoRA weights ({type(e).__name__}: "
                              f"{safety._first_line(e)[:200]})") from e


def _to_device(pipe, device) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise HarnessError(f"device {device!r} is not valid; expected e.g. cpu, cuda, cuda:1, mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {device!r} requested but CUDA is not available on this machine")
    pipe.to(dev)


def _weight_dtypes(src: Source) -> dict[str, int]:
    """Stored dtypes (tensor counts) from the safetensors headers, without loading anything."""
    files = [src.path] if src.kind == "single_file" else (
        sorted(src.path.rglob("*.safetensors")) if src.kind == "diffusers" else [])
    counts: dict[str, int] = {}
    for f in files:
        for dt, n in safety.read_safetensors_header(f).dtypes().items():
            counts[dt] = counts.get(dt, 0) + n
    return counts


def describe(source, *, allow_pickle: bool = False, cache_dir=None) -> dict:
    """What a checkpoint is, through the same loader: source kind, components, sizes, dtype, scheduler
    (for ``BASE::LORA@SCALE``, the base's facts, the LoRA's description and the scale; it must fuse)."""
    from harness.models.lora_spec import is_spec, parse_spec

    spec = parse_spec(source) if is_spec(source) else None
    src = resolve_source(spec.base if spec else source)
    pipe = load_pipeline(source, dtype=None, allow_pickle=allow_pickle, cache_dir=cache_dir)
    components = {}
    for name in ("unet", "vae", "text_encoder"):
        model = getattr(pipe, name)
        components[name] = {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                            "dtype": str(model.dtype).removeprefix("torch.")}
    components["tokenizer"] = {"class": type(pipe.tokenizer).__name__, "vocab_size": len(pipe.tokenizer)}
    components["scheduler"] = {"class": type(pipe.scheduler).__name__}
    loaded = {c["dtype"] for n, c in components.items() if "dtype" in c}
    stored = _weight_dtypes(src)
    size = (src.path.stat().st_size if src.path.is_file() else
            sum(f.stat().st_size for f in src.path.rglob("*") if f.is_file())) if src.path else None
    extra = {}
    if spec is not None:
        from harness.models.lora_info import describe_lora

        extra = {"lora": describe_lora(spec.lora), "lora_scale": spec.scale}
    return {
        "source": os.fspath(source),
        "kind": src.kind,
        "ref": src.ref,
        "pipeline": type(pipe).__name__,
        "components": components,
        "params_total": sum(c.get("params", 0) for c in components.values()),
        "dtype": loaded.pop() if len(loaded) == 1 else "mixed",
        "stored_dtypes": stored,
        "scheduler": type(pipe.scheduler).__name__,
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "resolution": int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor),
        "latent_channels": int(pipe.vae.config.latent_channels),
        "cross_attention_dim": pipe.unet.config.cross_attention_dim,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "bytes_on_disk": size,
        **extra,
    }
