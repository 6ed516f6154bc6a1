"""Features of explicit image lists (generated images of one prompt set, held-out references),
cached in ``RUN_DIR/cache`` keyed by everything that changes them: the files (path, size, mtime),
the extractor's identity, its input size and the resize mode. A resumed or re-scored run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def files_key(files: Sequence[Path], extractor) -> str:
    from harness.metrics.images import RESIZE_MODE

    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps([extractor.identity, extractor.input_size, RESIZE_MODE, bool(extractor.normalize)]).encode())
    return h.hexdigest()[:24]


def file_features(files: Sequence[Path], extractor, cache_dir: Path | None, *, batch_size: int = 32,
                  desc: str = "features", progress: bool = False) -> np.ndarray:
    """[N, D] float32 features of ``files`` in the given order (cached)."""
    from tqdm.auto import tqdm

    from harness.metrics.features import load_features, save_features
    from harness.metrics.images import load_image

    files = [Path(f) for f in files]
    path = None
    if cache_dir is not None and files:
        path = Path(cache_dir) / f"features-{files_key(files, extractor)}.npz"
        if path.is_file():
            log.info("%s: %d features from cache %s", desc, len(files), path.name)
            return load_features(path, extractor)["features"]
    out = []
    for i in tqdm(range(0, len(files), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(extractor.batch([load_image(f) for f in files[i:i + batch_size]]).numpy())
    feats = np.concatenate(out).astype(np.float32) if out else np.zeros((0, extractor.dim), np.float32)
    if path is not None:
        save_features(path, feats, extractor, n_files=len(files))
    return feats
