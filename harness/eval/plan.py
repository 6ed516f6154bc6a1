"""What an eval run will do, decided before any model runs: prompt items, reference images,
checkpoints with labels and hashes, and the check that a run folder belongs to this suite.

Everything here is cheap and deterministic, so every process of a sharded run computes the same plan.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import CheckpointError, ConfigError, HarnessError, UnsafeCheckpointError
from harness.eval import layout
from harness.eval.suite import Suite, read_prompt_file, resolve_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image to generate per checkpoint: a prompt of a prompt set, with a seed."""

    subset: str
    index: int
    prompt: str
    seed: int
    reference: str | None = None  # the held-out image whose caption the prompt is

    def file(self) -> str:
        return f"{self.subset}/{self.index:05d}_s{self.seed}.png"


@dataclass(frozen=True)
class Checkpoint:
    label: str
    role: str  # "base" | "candidate"
    source: str  # what the loader gets: a model, or BASE::LORA@SCALE (harness.models.lora_spec)
    sha256: str | None = None
    step: int | None = None  # training step, when the path names one (checkpoint-500, step_500)
    lora: str | None = None  # BASE::LORA@SCALE sources: the LoRA, its scale and the model it is fused into
    lora_scale: float | None = None
    lora_base: str | None = None


def heldout(data: str | Path | None, where: str) -> list:
    """Held-out (``val``) items of a dataset folder that have captions, in path order."""
    if data is None:
        raise ConfigError(f"{where}: uses the held-out split ('heldout: true'); pass --data DATASET")
    from harness.data.folder import scan_dataset

    index = scan_dataset(data, split="val", require_captions=True, verify=False)
    if not index.items:
        raise HarnessError(f"{data}: no held-out images with captions (split 'val'); run 'harness split {data}' "
                           "or put them in a val/ folder")
    return sorted(index.items, key=lambda it: it.rel)


def prompt_items(suite: Suite, suite_path: str | Path, data: str | Path | None) -> list[Item]:
    items: list[Item] = []
    for subset, ps in suite.prompts.items():
        refs: list[str | None]
        if ps.file is not None:
            prompts = read_prompt_file(resolve_path(suite_path, ps.file))
            refs = [None] * len(prompts)
        elif ps.prompts:
            prompts, refs = list(ps.prompts), [None] * len(ps.prompts)
        else:
            held = heldout(data, f"{suite_path}: prompts.{subset}")
            prompts = [" ".join(it.caption.split()) for it in held]
            refs = [str(it.path) for it in held]
        if ps.limit is not None:
            prompts, refs = prompts[: ps.limit], refs[: ps.limit]
        for i, (p, r) in enumerate(zip(prompts, refs)):
            for seed in suite.seeds:
                items.append(Item(subset=subset, index=i, prompt=p, seed=int(seed), reference=r))
    return items


def reference_files(suite: Suite, suite_path: str | Path, data: str | Path | None) -> list[Path]:
    """The real images set metrics compare with (empty when the suite names none)."""
    ref = suite.reference
    if ref is None:
        return []
    if ref.heldout:
        files = [Path(it.path) for it in heldout(data, f"{suite_path}: reference")]
    else:
        from harness.metrics.images import list_images

        files = list_images(resolve_path(suite_path, ref.folder))
    return files[: ref.limit] if ref.limit else files


_STEP = re.compile(r"(?:checkpoint|step|ckpt)[-_]?(\d+)$", re.IGNORECASE)


def training_step(source: str) -> int | None:
    m = _STEP.search(Path(str(source).rstrip("/")).name.split(".")[0])
    return int(m.group(1)) if m else None


_GENERIC = {"lora", "final", "pytorch_lora_weights", "adapter_model", "unet"}


def _slug(text: str) -> str:
    path = Path(str(text).rstrip("/"))
    name = path.name.removesuffix(".safetensors")
    while name in _GENERIC and path.parent.name:  # runs/style/lora -> style
        path = path.parent
        name = path.name
    if training_step(text) is not None and path.parent.name:
        name = f"{path.parent.name}-{name}"
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)[:48].strip("._") or "model"


def _check_source(src: str, allow_pickle: bool) -> dict:
    """Fail now on a missing or refused model or LoRA; the LoRA fields of a ``BASE::LORA@SCALE`` source."""
    from harness.models.load import resolve_source
    from harness.models.lora_format import find_lora
    from harness.models.lora_spec import is_spec, parse_spec
    from harness.models.safety import PICKLE_RISK

    spec = parse_spec(src) if is_spec(src) else None
    if resolve_source(spec.base if spec else src).kind == "pickle" and not allow_pickle:  # raises on a typo
        raise UnsafeCheckpointError(f"{src}: refused: {PICKLE_RISK}")
    if spec is None:
        return {}
    find_lora(spec.lora)  # a one-line error for a missing path or a file no loader reads
    return {"lora": spec.lora, "lora_scale": spec.scale, "lora_base": spec.base}


def checkpoints(base: str, candidates: list[str], *, allow_pickle: bool = False) -> list[Checkpoint]:
    """Labels ('base', then each candidate's folder/file name, made unique; ``LORA@SCALE`` for
    ``BASE::LORA@SCALE``); sources are checked now, so a typo or a refused pickle fails before an hour
    of generating the base model's images."""
    if not candidates:
        raise ConfigError("give at least one --candidate checkpoint")
    out, used = [], {"base"}
    for role, src in [("base", base)] + [("candidate", c) for c in candidates]:
        lora = _check_source(str(src), allow_pickle)
        if role == "base":
            label = "base"
        else:
            stem = f"{_slug(lora['lora'])}@{lora['lora_scale']:g}" if lora else _slug(src)
            label, k = stem, 2
            while label in used:
                label, k = f"{stem}-{k}", k + 1
        used.add(label)
        out.append(Checkpoint(label=label, role=role, source=str(src), step=training_step(lora.get("lora", src)),
                              **lora))
    return out


def hash_checkpoint(source: str) -> str:
    from harness.models.load import resolve_source
    from harness.models.lora_spec import is_spec, parse_spec
    from harness.provenance import tree_sha256

    if is_spec(source):  # the base's hash, the LoRA's and the scale, as one
        spec = parse_spec(source)
        joined = f"{hash_checkpoint(spec.base)}::{tree_sha256(spec.lora)}@{spec.scale!r}"
        return hashlib.sha256(joined.encode()).hexdigest()
    src = resolve_source(source)
    if src.kind == "hub":
        return f"hub:{src.ref}"  # the hub's revision is whatever the cache holds; recorded as the id
    return tree_sha256(src.ref)


def with_hashes(ckpts: list[Checkpoint]) -> list[Checkpoint]:
    return [Checkpoint(**{**asdict(c), "sha256": hash_checkpoint(c.source)}) for c in ckpts]


def check_run_dir(run_dir: Path, identity: dict, ckpts: list[Checkpoint]) -> dict | None:
    """The existing run.json if ``run_dir`` holds a run of this suite version with these checkpoints
    (to resume), None if it is new; an error if it holds anything else."""
    if not (run_dir / layout.RUN).is_file():
        if run_dir.exists() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
            raise HarnessError(f"{run_dir}: exists and is not an eval run folder; pick a new --out")
        return None
    old = layout.read_run(run_dir)
    s = old.get("suite", {})
    if s.get("hash") != identity["hash"] or s.get("name") != identity["name"]:
        raise HarnessError(
            f"{run_dir}: made by suite {s.get('name')!r} version {s.get('version')!r} (hash {s.get('hash')}), "
            f"not {identity['name']!r} version {identity['version']!r} (hash {identity['hash']}); "
            "its generations do not belong to this suite: use a new --out")
    was = {c["label"]: c for c in old.get("checkpoints", [])}
    for c in ckpts:
        prev = was.get(c.label)
        if prev and (prev.get("source") != c.source or (c.sha256 and prev.get("sha256") != c.sha256)):
            raise CheckpointError(
                f"{run_dir}: checkpoint {c.label!r} was {prev.get('source')} (sha256 {str(prev.get('sha256'))[:12]}) "
                f"when this run folder was made; now {c.source} (sha256 {str(c.sha256)[:12]}); use a new --out")
    return old
