"""Eval suites: what to generate, which metrics to compute against what, and which gates must pass.

A suite is a YAML file (validated like recipes, through :func:`harness.config.load_config`) such as
``eval/quick.yaml``. Paths inside it (prompt files, a reference folder) are relative to the suite
file. Its identity (name, declared version and a hash of the resolved content including prompt
files) is written into the run folder, so a run folder is never resumed by a different suite.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.config import load_config, to_dict
from harness.errors import ConfigError, HarnessError
from harness.eval.verdict import GATE_RULES
from harness.io import read_regular

_LABEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PromptSet:
    """Exactly one source: a prompt file (one prompt a line, ``#`` comments), inline prompts, or the
    captions of the held-out split of ``--data`` (``heldout: true``)."""

    file: str | None = None
    prompts: tuple[str, ...] = ()
    heldout: bool = False
    limit: int | None = field(default=None, metadata={"min": 1})
    # generic prompts measure forgetting; in_domain prompts measure what the fine-tune was for
    kind: Literal["generic", "in_domain"] = "generic"

    def __post_init__(self):
        n = (self.file is not None) + bool(self.prompts) + self.heldout
        if n != 1:
            raise ValueError("a prompt set needs exactly one of 'file', 'prompts' or 'heldout: true'")


@dataclass(frozen=True)
class Generation:
    width: int = field(default=512, metadata={"min": 8, "max": 4096})
    height: int = field(default=512, metadata={"min": 8, "max": 4096})
    steps: int = field(default=30, metadata={"min": 1, "max": 1000})
    cfg: float = field(default=7.5, metadata={"min": 0.0, "max": 100.0})
    scheduler: str | None = None  # a diffusers scheduler name; None keeps the checkpoint's own
    negative_prompt: str = ""
    batch_size: int = field(default=8, metadata={"min": 1})
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"

    def __post_init__(self):
        if self.width % 8 or self.height % 8:
            raise ValueError(f"generation size {self.width}x{self.height} must be divisible by 8 (the VAE's factor)")


@dataclass(frozen=True)
class MetricSpec:
    """One metric under the suite's label for it (``fid_clip``), naming a registry entry and settings."""

    metric: str | None = None  # registry name; defaults to the label
    subsets: tuple[str, ...] = ()  # prompt sets it is computed on; empty = all
    settings: dict[str, Any] = field(default_factory=dict)  # passed to the metric's constructor
    # an optional metric whose model (models.estimator / models.detector) is not given is skipped with
    # a note in the report instead of stopping the run
    optional: bool = False


@dataclass(frozen=True)
class Reference:
    """Real images the generations are compared with (FID/KID/CMMD, cluster KL's original data)."""

    folder: str | None = None  # relative to the suite file, or absolute
    heldout: bool = False  # the held-out split of --data
    limit: int | None = field(default=None, metadata={"min": 1})


@dataclass(frozen=True)
class Grid:
    """An x/y/z grid rendered for base and every candidate (axes in ``harness grid`` syntax)."""

    name: str
    prompt: str
    x: str
    y: str | None = None
    z: str | None = None
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Xray:
    samples: int = field(default=2, metadata={"min": 0})  # first N prompts of the first prompt set
    vae_every: int = field(default=0, metadata={"min": 0})  # also VAE-decode the predicted image every N steps


@dataclass(frozen=True)
class Gate:
    min: float | None = None
    max: float | None = None
    min_mean: float | None = None
    max_mean: float | None = None
    max_increase: float | None = None
    max_decrease: float | None = None
    subset: str | None = None  # only this prompt set; None = every subset the metric has

    def rules(self) -> list[tuple[str, float]]:
        return [(r, getattr(self, r)) for r in GATE_RULES if getattr(self, r) is not None]


@dataclass(frozen=True)
class CI:
    n_boot: int = field(default=1000, metadata={"min": 10})
    alpha: float = field(default=0.05, metadata={"min": 0.001, "max": 0.5})
    seed: int = 0
    margin: float = field(default=0.0, metadata={"min": 0.0})  # practical-difference margin for verdicts


@dataclass(frozen=True)
class Models:
    """Models the metrics use. Strings are hub names, local folders or files."""

    clip: str = "ViT-B-32:openai"  # open_clip MODEL:PRETRAINED, or a local open_clip folder
    detector: str | None = None  # cluster KL's detector (ultralytics weights or a harness YOLO folder)
    estimator: str | None = None  # artifact estimator file from `harness estimator train`


@dataclass(frozen=True)
class Suite:
    name: str
    prompts: dict[str, PromptSet]
    metrics: dict[str, MetricSpec]
    version: str = "1"
    description: str = ""
    seeds: tuple[int, ...] = (0,)  # every prompt is generated once per seed
    generation: Generation = field(default_factory=Generation)
    models: Models = field(default_factory=Models)
    reference: Reference | None = None
    grids: tuple[Grid, ...] = ()
    xray: Xray = field(default_factory=Xray)
    gates: dict[str, Gate] = field(default_factory=dict)
    ci: CI = field(default_factory=CI)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("key 'prompts': a suite needs at least one prompt set")
        if not self.seeds:
            raise ValueError("key 'seeds': a suite needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"key 'seeds' = {list(self.seeds)}: seeds repeat")
        for label in [*self.prompts, *self.metrics]:
            if not _LABEL.match(label):
                raise ValueError(f"label {label!r}: use letters, digits, '_', '-' or '.'")
        for label, spec in self.metrics.items():
            for s in spec.subsets:
                if s not in self.prompts:
                    raise ValueError(f"key 'metrics.{label}.subsets': unknown prompt set {s!r}; "
                                     f"prompt sets: {', '.join(self.prompts)}")
        for label, gate in self.gates.items():
            if label not in self.metrics:
                raise ValueError(f"key 'gates.{label}': no metric labelled {label!r}; metrics: {', '.join(self.metrics)}")
            if not gate.rules():
                raise ValueError(f"key 'gates.{label}': give at least one of {', '.join(GATE_RULES)}")
            if gate.subset is not None and gate.subset not in self.prompts:
                raise ValueError(f"key 'gates.{label}.subset': unknown prompt set {gate.subset!r}")

    def metric_name(self, label: str) -> str:
        return self.metrics[label].metric or label

    def subsets_of(self, label: str) -> tuple[str, ...]:
        return self.metrics[label].subsets or tuple(self.prompts)

    @property
    def needs_data(self) -> bool:
        return any(p.heldout for p in self.prompts.values()) or bool(self.reference and self.reference.heldout)


def _registry():
    from harness.metrics.registry import METRICS, register_metric

    # The artifact estimator (an earlier stage) provides its metric; register it if the registry lacks it.
    if "artifact_score" not in METRICS:
        register_metric("artifact_score", "harness.estimator.metric:ArtifactScore")
    return METRICS


def known_metrics() -> dict[str, Any]:
    """Names a suite may use: the metrics registry (:mod:`harness.metrics.registry`)."""
    return dict(_registry())


def metric_class(name: str):
    from harness.metrics.registry import get_metric_class

    _registry()
    return get_metric_class(name)


def check_metric_names(suite: Suite, where: str, known: dict[str, Any] | None = None) -> None:
    known = known_metrics() if known is None else known
    for label in suite.metrics:
        name = suite.metric_name(label)
        if name not in known:
            raise ConfigError(f"{where}: key 'metrics.{label}': unknown metric {name!r}; "
                              f"known metrics: {', '.join(sorted(known))}")


SUITE_CLIP = "models.clip"  # a set metric's settings.extractor naming the suite's CLIP (models.clip)
EXTRACTOR_SETTINGS = ("crop", "resize", "input_size")  # set-metric settings that change its features


def extractor_spec(suite: Suite, label: str, cls=None):
    """The extractor a set metric of the suite uses: ``settings.extractor`` when given (``models.clip``
    = the suite's CLIP), else the metric's own default, the model its reference uses."""
    spec = suite.metrics[label].settings.get("extractor")
    if spec == SUITE_CLIP:
        return f"clip:{suite.models.clip}"
    if spec:
        return spec
    cls = cls or metric_class(suite.metric_name(label))
    return cls.default_extractor


def _is_set_metric(cls) -> bool:
    from harness.metrics.fid import FeatureSetMetric

    return isinstance(cls, type) and issubclass(cls, FeatureSetMetric)


def _local_hint(kind: str, key: str) -> str:
    if key == SUITE_CLIP:
        return f"--set {key}=DIR (a local open_clip folder)"
    folder = {"clip": "clip:DIR (a local open_clip folder)", "dinov2": "dinov2:DIR (a local DINOv2 folder)"}
    return f"--set {key}={folder.get(kind, 'clip:DIR or dinov2:DIR')}"


def check_extractors(suite: Suite, where: str) -> None:
    """Fail in one line, before anything is generated, when a set metric's extractor (or CLIP score's
    CLIP) cannot load here: a missing folder or package, or offline weights that are not cached."""
    from harness.metrics.extractors import EXTRACTORS, extractor_problem

    for label, spec in suite.metrics.items():
        name = suite.metric_name(label)
        cls = metric_class(name)
        if _is_set_metric(cls):
            ext = extractor_spec(suite, label, cls)
            key = SUITE_CLIP if spec.settings.get("extractor") == SUITE_CLIP else f"metrics.{label}.settings.extractor"
        elif name == "clip_score":
            ext = spec.settings.get("model") or f"clip:{suite.models.clip}"
            key = f"metrics.{label}.settings.model" if spec.settings.get("model") else SUITE_CLIP
        else:
            continue
        kind = ext.partition(":")[0] if isinstance(ext, str) else None
        problem = extractor_problem(ext) if kind in EXTRACTORS else None
        if problem:
            raise ConfigError(f"{where}: metric {label!r} ({name}) uses {ext}: {problem}; point it at a local "
                              f"copy with {_local_hint(kind, key)}")


def load_suite(path: str | Path, overrides: list[str] | None = None, *, check_names: bool = True) -> Suite:
    """Read and validate a suite file; ``overrides`` are ``key=value`` strings (``ci.n_boot=200``)."""
    suite = load_config(Suite, path, overrides)
    base = Path(path).parent
    for label, ps in suite.prompts.items():
        if ps.file is None:
            continue
        if not _resolve(base, ps.file).is_file():
            raise ConfigError(f"{path}: key 'prompts.{label}.file' = {ps.file!r}: no such file "
                              f"(looked for {_resolve(base, ps.file)})")
        # prompt lines end up in the report: a suite someone sent must not pull in /etc/passwd or ~/.ssh
        real, root = _resolve(base, ps.file).resolve(), base.resolve()
        if not real.is_relative_to(root):
            raise ConfigError(f"{path}: key 'prompts.{label}.file' = {ps.file!r}: resolves to {real}, outside the "
                              f"suite's folder {root}; keep prompt files beside the suite (or in a folder below it)")
    if suite.reference and suite.reference.folder and not _resolve(base, suite.reference.folder).is_dir():
        raise ConfigError(f"{path}: key 'reference.folder' = {suite.reference.folder!r}: not a folder")
    if suite.reference and suite.reference.folder and suite.reference.heldout:
        raise ConfigError(f"{path}: key 'reference': give 'folder' or 'heldout: true', not both")
    if check_names:
        check_metric_names(suite, str(path))
    return suite


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


MAX_PROMPT_FILE_BYTES = 4 << 20  # ~40k prompts of 100 characters


def read_prompt_file(path: Path) -> list[str]:
    try:
        text = read_regular(path, MAX_PROMPT_FILE_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: prompt file is not UTF-8 text") from None
    except HarnessError as e:
        raise ConfigError(str(e)) from None
    lines = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ConfigError(f"{path}: prompt file has no prompts (one a line; '#' starts a comment)")
    return prompts


def resolve_path(suite_path: str | Path, p: str) -> Path:
    return _resolve(Path(suite_path).parent, p)


# Keys that change what is generated (and so what a run folder's images and caches are). Metrics,
# gates, CI settings and descriptions can change between reruns of one folder: scores are recomputed.
IDENTITY_KEYS = ("name", "version", "prompts", "seeds", "generation", "reference", "grids", "xray")


def suite_identity(suite: Suite, suite_path: str | Path) -> dict:
    """Name, declared version, ``hash`` of what decides the generated images (the keys above plus the
    prompt files' contents) and ``full_hash`` of the whole resolved suite."""
    d = to_dict(suite)
    h = hashlib.sha256(json.dumps({k: d[k] for k in IDENTITY_KEYS}, sort_keys=True, default=str).encode())
    for label, ps in sorted(suite.prompts.items()):
        if ps.file is not None:
            h.update(label.encode())
            h.update(resolve_path(suite_path, ps.file).read_bytes())
    full = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    full.update(h.digest())
    return {"name": suite.name, "version": suite.version, "hash": h.hexdigest()[:16],
            "full_hash": full.hexdigest()[:16], "path": str(suite_path)}
