"""The on-disk feature cache: features of image files or folders, keyed by the files and the extractor.

The extractors themselves live in :mod:`harness.metrics.extractors` (re-exported here, where callers
have always imported them from).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.io import atomic_write
from harness.metrics.extractors import (  # noqa: F401  (re-exported)
    EXTRACTORS,
    INCEPTION_WEIGHTS,
    OPTIONS,
    RESIZES,
    ClipExtractor,
    Dinov2Extractor,
    Extractor,
    InceptionExtractor,
    ModuleExtractor,
    _image_size_of,
    _local_identity,
    _normalize_of,
    get_extractor,
    inception_problem,
    load_open_clip,
)
from harness.metrics.images import list_images, load_image

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: identities name crop / resize / normalisation; DINOv2 at 224


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
        log.warning("%s: images of %d different sizes; each is resized to %s by %s (crop: %s)", desc, len(sizes),
                    extractor.input_size, RESIZES[extractor.resize], extractor.crop)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, extractor.dim), np.float32)


def extract_folder(folder, extractor: Extractor, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Features [N, D] float32 of every image in ``folder`` (sorted order), streamed in batches."""
    return extract_files(list_images(folder), extractor, batch_size=batch_size, progress=progress,
                         desc=f"features {Path(folder).name}")


def files_key(files, extractor: Extractor) -> str:
    """Cache key of an explicit file list: resolved paths, sizes, modification times, and the extractor,
    its input size (the identity names crop, resize mode and normalisation: everything else that
    changes the features)."""
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([extractor.identity, extractor.input_size, CACHE_VERSION]).encode())
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
    key = hashlib.sha256(json.dumps([_folder_key(files, folder), extractor.identity, extractor.input_size,
                                     CACHE_VERSION]).encode())
    path = Path(cache_dir) / f"{folder.name}-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        log.info("features of %s from cache %s", folder, path)
        return load_features(path, extractor)["features"]
    feats = extract_folder(folder, extractor, batch_size=batch_size, progress=progress)
    save_features(path, feats, extractor, folder=str(folder.resolve()), n_images=len(files))
    return feats
