"""Feature extractors (a registry of names) and the on-disk feature cache.

An extractor turns a uint8 batch [N, 3, S, S] (already resized by :func:`images.to_batch`) into
float32 features [N, D] on the CPU. Its ``identity`` names everything that changes the features
(model and weights, input size, resize mode, output normalisation); the cache key and every result
record it, and comparing features from two identities is refused.

Spec strings (``get_extractor``):
  ``clip:NAME_OR_PATH``   open_clip image tower. A folder loads as ``local-dir:PATH``; ``hf-hub:ORG/REPO``
                          passes through; ``ARCH:PRETRAINED`` (e.g. ``clip:ViT-L-14:openai``) names a zoo model.
                          Features are L2-normalised (what CMMD and FID-CLIP use).
  ``inception``           torch-fidelity's FID Inception-v3 (pool3, 2048-d). Needs ``torch-fidelity`` and its
                          weights file; offline without them => HarnessError naming the file to place.
  ``dinov2:NAME_OR_PATH`` transformers DINOv2 CLS token (hub id or local folder).
  an ``nn.Module``        uint8 [N, 3, H, W] -> [N, D] (torchmetrics' ``feature=`` convention).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.io import atomic_write
from harness.metrics.images import RESIZE_MODE, list_images, load_image, to_batch

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class Extractor:
    """Base: ``__call__(uint8 [N,3,S,S]) -> float32 [N, D]`` on the CPU."""

    input_size: int | None = None
    identity: str = "extractor"
    normalize: bool = False

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._dim: int | None = None

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
        """Any image input -> features, through the one resize path."""
        return self(to_batch(images, self.input_size))

    def describe(self) -> dict:
        return {"extractor": self.identity, "input_size": self.input_size, "resize": RESIZE_MODE,
                "input_dtype": "uint8", "l2_normalized": self.normalize, "dim": self.dim}


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
        self.identity = f"module:{name or type(module).__name__}@{_state_hash(module)}"

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
    normalize = True

    def __init__(self, spec: str, device="cpu"):
        super().__init__(device)
        self.model, preprocess, self.identity, _ = load_open_clip(spec, device=self.device)
        self.mean, self.std = _normalize_of(preprocess)
        self.input_size = _image_size_of(self.model)

    def forward(self, x):
        return self.model.encode_image(self._prep(x))


def _inception_weights() -> Path:
    env = os.environ.get("HARNESS_INCEPTION_WEIGHTS")
    if env:
        return Path(env)
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def _offline() -> bool:
    return any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "HARNESS_OFFLINE", "YOLO_OFFLINE"))


class InceptionExtractor(Extractor):
    """torch-fidelity's FID Inception (the TF-ported weights every published FID uses)."""

    input_size = 299
    identity = "inception:torch-fidelity-2015-12-05-pool3"

    def __init__(self, device="cpu"):
        super().__init__(device)
        weights = _inception_weights()
        help_ = (f"place {INCEPTION_WEIGHTS} (from torch-fidelity's GitHub releases) at {weights} or set "
                 "HARNESS_INCEPTION_WEIGHTS, or use --extractor clip:... / dinov2:...")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise HarnessError(f"inception: needs the torch-fidelity package (pip install torch-fidelity); {help_}") \
                from e
        if not weights.is_file() and _offline():
            raise HarnessError(f"inception: weights not found and running offline; {help_}")
        try:
            self.model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"],
                feature_extractor_weights_path=str(weights) if weights.is_file() else None,
            ).eval().to(self.device)
        except Exception as e:
            raise HarnessError(f"inception: cannot load the weights ({type(e).__name__}: {e}); {help_}") from e

    def forward(self, x):
        return self.model(x)[0]


class Dinov2Extractor(_Normalized):
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, spec: str, device="cpu"):
        super().__init__(device)
        from transformers import AutoModel

        p = Path(spec)
        self.identity = _local_identity("dinov2", p) if p.is_dir() else f"dinov2:{spec}"
        try:
            self.model = AutoModel.from_pretrained(spec).eval().to(self.device)
        except Exception as e:
            raise HarnessError(f"dinov2:{spec}: cannot load the model ({type(e).__name__}: {e})".split("\n")[0]) \
                from e
        size = getattr(self.model.config, "image_size", 224)
        self.input_size = int(size)

    def forward(self, x):
        out = self.model(pixel_values=self._prep(x))
        return out.last_hidden_state[:, 0]  # CLS token, before any head


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


# ----------------------------------------------------------------------------------------------
# Folder features and the .npz cache


def _folder_key(files: list[Path], root: Path) -> str:
    """Names, sizes and modification times: a changed or added image gives a new key."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def extract_files(files, extractor: Extractor, *, batch_size: int = 64, progress: bool = False,
                  desc: str = "features") -> np.ndarray:
    """Features [N, D] float32 of ``files`` in the given order, streamed in batches."""
    from tqdm.auto import tqdm

    files = [Path(f) for f in files]
    out, sizes = [], set()
    for i in tqdm(range(0, len(files), batch_size), desc=desc, disable=not progress, leave=False):
        imgs = [load_image(f) for f in files[i:i + batch_size]]
        sizes.update(im.size for im in imgs)
        out.append(extractor.batch(imgs).numpy())
    if len(sizes) > 1:
        log.warning("%s: images of %d different sizes; each is resized to %s by %s", desc, len(sizes),
                    extractor.input_size, RESIZE_MODE)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, extractor.dim), np.float32)


def extract_folder(folder, extractor: Extractor, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Features [N, D] float32 of every image in ``folder`` (sorted order), streamed in batches."""
    return extract_files(list_images(folder), extractor, batch_size=batch_size, progress=progress,
                         desc=f"features {Path(folder).name}")


def files_key(files, extractor: Extractor) -> str:
    """Cache key of an explicit file list: resolved paths, sizes, modification times, and the extractor,
    its input size and the resize mode (everything that changes the features)."""
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([extractor.identity, extractor.input_size, RESIZE_MODE, bool(extractor.normalize),
                         CACHE_VERSION]).encode())
    return h.hexdigest()[:24]


def file_features(files, extractor: Extractor, cache_dir=None, *, batch_size: int = 32,
                  desc: str = "features", progress: bool = False) -> np.ndarray:
    """[N, D] float32 features of ``files`` in the given order, cached in ``cache_dir`` by :func:`files_key`."""
    files = [Path(f) for f in files]
    path = None
    if cache_dir is not None and files:
        path = Path(cache_dir) / f"features-{files_key(files, extractor)}.npz"
        if path.is_file():
            log.info("%s: %d features from cache %s", desc, len(files), path.name)
            return load_features(path, extractor)["features"]
    feats = extract_files(files, extractor, batch_size=batch_size, progress=progress, desc=desc)
    if path is not None:
        save_features(path, feats, extractor, n_files=len(files))
    return feats


def save_features(path, features: np.ndarray, extractor: Extractor | str, **meta) -> Path:
    """Write features with their mean, covariance (float64), count and extractor identity."""
    f64 = features.astype(np.float64)
    ident = extractor if isinstance(extractor, str) else extractor.identity
    desc = {} if isinstance(extractor, str) else extractor.describe()
    arrays = {
        "features": features.astype(np.float32), "mean": f64.mean(0),
        "cov": np.cov(f64, rowvar=False) if len(f64) > 1 else np.zeros((f64.shape[1],) * 2),
        "count": np.array(len(features)), "extractor": np.array(ident),
        "meta": np.array(json.dumps({**desc, **meta, "cache_version": CACHE_VERSION}, default=str)),
    }

    def write(fh):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        fh.write(buf.getvalue())

    return atomic_write(path, write)


def load_features(path, extractor: Extractor | str | None = None) -> dict:
    """Read a features ``.npz``; refuse it if it was made by another extractor."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise HarnessError(f"{path}: not a readable features .npz ({e})") from e
    found = str(data["extractor"])
    if extractor is not None:
        want = extractor if isinstance(extractor, str) else extractor.identity
        if found != want:
            raise HarnessError(f"{path}: features were made by {found!r}, not {want!r}; "
                               "features from different extractors are not comparable")
    data["extractor"], data["meta"] = found, json.loads(str(data["meta"]))
    return data


def folder_features(folder, extractor: Extractor, *, cache_dir=None, batch_size: int = 64,
                    progress: bool = False) -> np.ndarray:
    """Features of a folder, from ``cache_dir`` when the same images/extractor/resize were seen before."""
    folder = Path(folder)
    if cache_dir is None:
        return extract_folder(folder, extractor, batch_size=batch_size, progress=progress)
    files = list_images(folder)
    key = hashlib.sha256(json.dumps([_folder_key(files, folder), extractor.identity, RESIZE_MODE,
                                     extractor.input_size, extractor.normalize, CACHE_VERSION]).encode())
    path = Path(cache_dir) / f"{folder.name}-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        log.info("features of %s from cache %s", folder, path)
        return load_features(path, extractor)["features"]
    feats = extract_folder(folder, extractor, batch_size=batch_size, progress=progress)
    save_features(path, feats, extractor, folder=str(folder.resolve()), n_images=len(files))
    return feats
