"""Feature extractors (a registry of names); the on-disk cache of their features is :mod:`features`.

An extractor turns uint8 images into float32 features [N, D] on the CPU. Its ``identity`` names
everything that changes the features (model and weights, crop, resize mode, L2 normalisation; the
cache key adds the input size); the cache and every result record it, and comparing features from two
identities is refused. ``variant(...)`` gives a copy sharing the model with other preprocessing: each
metric asks for what its reference does (``FeatureSetMetric.extractor_options``).

Spec strings (``get_extractor``):
  ``clip:NAME_OR_PATH``   open_clip image tower (``encode_image``). A folder loads as ``local-dir:PATH``;
                          ``hf-hub:ORG/REPO`` passes through; ``ARCH:PRETRAINED`` (``clip:ViT-L-14-336:openai``)
                          names a zoo model. Built alone it gives L2-normalised features of the stretched
                          image (what cluster KL embeds crops with); metrics pick their own variant.
  ``inception``           torch-fidelity's FID Inception-v3 (pool3, 2048-d). Needs ``torch-fidelity`` and its
                          weights file; offline without them => HarnessError naming the file to place.
  ``dinov2:NAME_OR_PATH`` transformers DINOv2 CLS token (hub id or local folder), at 224 px (dgm-eval's size,
                          whatever the model config says; ``input_size`` changes it).
  an ``nn.Module``        uint8 [N, 3, H, W] -> [N, D] (torchmetrics' ``feature=`` convention).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.metrics.images import CROPS, RESIZE_MODE, to_batch

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
OPTIONS = ("normalize", "crop", "resize", "input_size")
# resize modes: "clean" = PIL bicubic on uint8 before the model (images.py); "legacy-torchmetrics" =
# the image at its own size into torch-fidelity's TF1-style bilinear resize (torchmetrics' FID)
RESIZES = {"clean": RESIZE_MODE, "legacy-torchmetrics": "native size -> torch-fidelity tf1 bilinear"}


class Extractor:
    """Base: ``__call__(uint8 [N,3,S,S]) -> float32 [N, D]`` on the CPU; ``batch`` prepares any images."""

    kind = "module"
    input_size: int | None = None
    model_id: str = "extractor"
    normalize: bool = False
    crop: str = "none"  # images.CROPS
    resize: str = "clean"  # RESIZES
    resizes: tuple[str, ...] = ("clean",)  # the resize modes this extractor supports
    sizable = False  # whether input_size may change (the model is not tied to one size)

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._dim: int | None = None

    @property
    def identity(self) -> str:
        tags = ["l2" if self.normalize else None, None if self.crop == "none" else self.crop,
                None if self.resize == "clean" else self.resize,
                f"{self.input_size}px" if self.sizable and self.input_size else None]
        return self.model_id + "".join(f"+{t}" for t in tags if t)

    def variant(self, **options) -> Extractor:
        """This extractor with other preprocessing (``OPTIONS``), sharing the model; itself if nothing changes."""
        options = {k: v for k, v in options.items() if v is not None}
        unknown = [k for k in options if k not in OPTIONS]
        if unknown:
            raise HarnessError(f"extractor option {unknown[0]!r}: unknown; known: {', '.join(OPTIONS)}")
        if options.get("crop", self.crop) not in CROPS:
            raise HarnessError(f"crop {options['crop']!r}: unknown; known: {', '.join(CROPS)}")
        if options.get("resize", self.resize) not in self.resizes:
            raise HarnessError(f"resize {options['resize']!r}: {self.model_id} supports {', '.join(self.resizes)}")
        if "input_size" in options:
            options["input_size"] = int(options["input_size"])
            if options["input_size"] != self.input_size and not self.sizable:
                raise HarnessError(f"input_size {options['input_size']}: {self.model_id} takes "
                                   f"{self.input_size} px images only")
        options = {k: (bool(v) if k == "normalize" else v) for k, v in options.items()}
        if all(getattr(self, k) == v for k, v in options.items()):
            return self
        new = copy.copy(self)
        new.__dict__.update(options)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 on self.device
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        f = self.forward(images.to(self.device)).float()
        if self.normalize:
            f = torch.nn.functional.normalize(f, dim=-1)
        return f.cpu()

    @property
    def dim(self) -> int:
        if self._dim is None:  # one dummy image tells the width
            s = self.input_size or 32
            try:
                self._dim = int(self(torch.zeros(1, 3, s, s, dtype=torch.uint8)).shape[-1])
            except RuntimeError as e:
                raise HarnessError(f"{self.identity}: a {s}x{s} dummy image failed ({e}); give the extractor "
                                   "its input_size, or the metric num_features") from e
        return self._dim

    def batch(self, images) -> torch.Tensor:
        """Any image input -> features, through the one resize path (or, legacy-torchmetrics, none)."""
        if self.resize != "legacy-torchmetrics":
            return self(to_batch(images, self.input_size, self.crop))
        if isinstance(images, torch.Tensor):
            return self(to_batch(images, None))
        # each size in its own batch: the model resizes every image itself, so grouping changes nothing
        arrays = [to_batch([im], None) for im in images]
        out: list[torch.Tensor | None] = [None] * len(arrays)
        for shape in dict.fromkeys(a.shape for a in arrays):
            idx = [i for i, a in enumerate(arrays) if a.shape == shape]
            for i, f in zip(idx, self(torch.cat([arrays[i] for i in idx]))):
                out[i] = f
        return torch.stack(out)

    def describe(self) -> dict:
        return {"extractor": self.identity, "input_size": self.input_size, "resize": RESIZES[self.resize],
                "crop": self.crop, "input_dtype": "uint8", "l2_normalized": self.normalize, "dim": self.dim}


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


class ModuleExtractor(Extractor):
    """A user ``nn.Module``: uint8 [N, 3, H, W] -> [N, D]. ``input_size`` None keeps native sizes."""

    def __init__(self, module: torch.nn.Module, *, input_size: int | None = None, name: str | None = None,
                 normalize: bool = False, device="cpu"):
        super().__init__(device)
        self.module = module.eval().to(self.device)
        self.input_size = input_size
        self.normalize = normalize
        self.model_id = f"module:{name or type(module).__name__}@{_state_hash(module)}"

    def forward(self, x):
        out = self.module(x)
        return out[0] if isinstance(out, (tuple, list)) else out


class _Normalized(Extractor):
    """uint8 -> [0, 1] -> (x - mean) / std -> model."""

    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255.0 - m) / s


def _local_identity(kind: str, path: Path) -> str:
    from harness.provenance import tree_sha256

    return f"{kind}:{path.resolve()}@{tree_sha256(path)[:12]}"


def load_open_clip(spec: str, device="cpu"):
    """``NAME_OR_PATH`` -> (model, preprocess, identity, open_clip name); a folder is a ``local-dir``."""
    import open_clip

    p = Path(spec)
    if p.is_dir():
        name, pretrained, identity = f"local-dir:{p}", None, _local_identity("clip", p)
    elif spec.startswith("hf-hub:"):
        name, pretrained, identity = spec, None, f"clip:{spec}"
    else:
        name, _, pretrained = spec.partition(":")
        pretrained = pretrained or None
        identity = f"clip:{name}:{pretrained or 'random'}"
        if name not in open_clip.list_models():
            raise HarnessError(f"clip:{spec}: not a folder and not an open_clip model name "
                               f"(e.g. clip:ViT-B-32:openai, clip:hf-hub:ORG/REPO, clip:/path/to/local-dir)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except Exception as e:  # offline downloads and bad folders surface as many exception types
        raise HarnessError(f"clip:{spec}: cannot load the open_clip model ({type(e).__name__}: {e})".split("\n")[0]) \
            from e
    return model.eval(), preprocess, identity, name


def _normalize_of(preprocess) -> tuple[tuple, tuple]:
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _image_size_of(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class ClipExtractor(_Normalized):
    kind = "clip"
    normalize = True

    def __init__(self, spec: str, device="cpu"):
        super().__init__(device)
        self.model, preprocess, self.model_id, _ = load_open_clip(spec, device=self.device)
        self.mean, self.std = _normalize_of(preprocess)  # the model's own (OpenAI's for OpenAI weights)
        self.input_size = _image_size_of(self.model)

    def forward(self, x):
        return self.model.encode_image(self._prep(x))


def _inception_weights() -> Path:
    env = os.environ.get("HARNESS_INCEPTION_WEIGHTS")
    if env:
        return Path(env)
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def _offline() -> bool:
    return any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "HARNESS_OFFLINE", "YOLO_OFFLINE",
                                                   "TRANSFORMERS_OFFLINE"))


def inception_problem() -> str | None:
    """Why the Inception extractor cannot load here (a one-line reason and the fix), or None."""
    weights = _inception_weights()
    help_ = (f"place {INCEPTION_WEIGHTS} (from torch-fidelity's GitHub releases) at {weights} or set "
             "HARNESS_INCEPTION_WEIGHTS, or use --extractor clip:... / dinov2:...")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return f"inception: needs the torch-fidelity package (pip install torch-fidelity); {help_}"
    if not weights.is_file() and _offline():
        return f"inception: weights not found and running offline; {help_}"
    return None


class InceptionExtractor(Extractor):
    """torch-fidelity's FID Inception (the TF-ported weights every published FID uses)."""

    kind = "inception"
    input_size = 299
    model_id = "inception:torch-fidelity-2015-12-05-pool3"
    resizes = ("clean", "legacy-torchmetrics")

    def __init__(self, device="cpu"):
        super().__init__(device)
        problem = inception_problem()
        if problem:
            raise HarnessError(problem)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        weights = _inception_weights()
        try:
            self.model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"],
                feature_extractor_weights_path=str(weights) if weights.is_file() else None,
            ).eval().to(self.device)
        except Exception as e:
            raise HarnessError(f"inception: cannot load the weights ({type(e).__name__}: {e}); place "
                               f"{INCEPTION_WEIGHTS} at {weights} or set HARNESS_INCEPTION_WEIGHTS") from e

    def forward(self, x):
        # torch-fidelity resizes any uint8 input to 299 with its TF1-style bilinear (a no-op at 299)
        return self.model(x)[0]


class Dinov2Extractor(_Normalized):
    kind = "dinov2"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    sizable = True  # patch embeddings are interpolated to any multiple of the patch size

    def __init__(self, spec: str, device="cpu", input_size: int = 224):
        super().__init__(device)
        from transformers import AutoModel

        p = Path(spec)
        self.model_id = _local_identity("dinov2", p) if p.is_dir() else f"dinov2:{spec}"
        try:
            self.model = AutoModel.from_pretrained(spec).eval().to(self.device)
        except Exception as e:
            raise HarnessError(f"dinov2:{spec}: cannot load the model ({type(e).__name__}: {e})".split("\n")[0]) \
                from e
        # dgm-eval (Stein et al. 2023) feeds 224 px whatever the config's pretraining size (518 for the hub's)
        self.input_size = int(input_size)

    def forward(self, x):
        out = self.model(pixel_values=self._prep(x))
        return out.last_hidden_state[:, 0]  # CLS token after the final layer norm (torch.hub's x_norm_clstoken)


EXTRACTORS = {
    "clip": lambda arg, device: ClipExtractor(arg, device=device),
    "inception": lambda arg, device: InceptionExtractor(device=device),
    "dinov2": lambda arg, device: Dinov2Extractor(arg, device=device),
}


def get_extractor(spec, device="cpu", **module_kwargs) -> Extractor:
    """A spec string (see the module docstring), an ``Extractor``, or an ``nn.Module``."""
    if isinstance(spec, Extractor):
        return spec
    if isinstance(spec, torch.nn.Module):
        return ModuleExtractor(spec, device=device, **module_kwargs)
    if not isinstance(spec, str) or not spec:
        raise HarnessError(f"extractor: expected a name like 'clip:PATH', 'inception', 'dinov2:PATH' "
                           f"or an nn.Module, got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind not in EXTRACTORS:
        raise HarnessError(f"extractor {spec!r}: unknown kind {kind!r}; known: {', '.join(EXTRACTORS)}")
    if kind in ("clip", "dinov2") and not arg:
        raise HarnessError(f"extractor {spec!r}: {kind} needs a model name or folder, e.g. '{kind}:PATH'")
    return EXTRACTORS[kind](arg, device)


# --- can a spec load here? (checked before an eval generates anything) -----------------------------

def _hf_cached(repo: str, filenames) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in filenames)


def _clip_problem(arg: str) -> str | None:
    import open_clip

    if Path(arg).is_dir():
        return None
    if arg.startswith("hf-hub:"):
        cached = _hf_cached(arg[len("hf-hub:"):], ("open_clip_config.json",))
        return None if cached or not _offline() else f"clip:{arg}: not in the Hugging Face cache and running offline"
    arch, _, tag = arg.partition(":")
    if arch not in open_clip.list_models():
        return f"clip:{arg}: not a folder and not an open_clip model name (e.g. clip:ViT-B-32:openai, clip:/path/to/dir)"
    if not tag or not _offline():
        return None
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        return f"clip:{arg}: open_clip has no pretrained weights {tag!r} for {arch}"
    hub = cfg.get("hf_hub", "")
    repo, name = os.path.split(hub) if hub else ("", "")
    files = [name] if name else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    url = cfg.get("url", "")
    if (repo and _hf_cached(repo.rstrip("/"), files)) or (url and (Path.home() / ".cache" / "clip" /
                                                                    os.path.basename(url)).is_file()):
        return None
    return f"clip:{arg}: weights not in the local caches and running offline"


def extractor_problem(spec: str) -> str | None:
    """Why ``spec`` cannot load here, in one line (no model is loaded), or None. Offline, weights that
    are not in the local caches are a problem; online they download when first used."""
    kind, _, arg = spec.partition(":")
    if kind not in EXTRACTORS:
        return f"extractor {spec!r}: unknown kind {kind!r}; known: {', '.join(EXTRACTORS)}"
    if kind == "inception":
        return inception_problem()
    if not arg:
        return f"extractor {spec!r}: {kind} needs a model name or folder, e.g. '{kind}:PATH'"
    if kind == "clip":
        return _clip_problem(arg)
    if Path(arg).is_dir() or not _offline() or _hf_cached(arg, ("config.json",)):
        return None
    return f"dinov2:{arg}: not in the Hugging Face cache and running offline"
