"""One-call scoring of image folders (what ``harness score`` and the eval runner call).

``score_sets`` extracts each folder's features once per extractor (cached on disk when
``cache_dir`` is given) and feeds the same features to every requested set metric.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from harness.errors import HarnessError
from harness.metrics.features import folder_features, get_extractor
from harness.metrics.images import list_images, load_image
from harness.metrics.registry import FEATURE_METRICS, get_metric_class

log = logging.getLogger(__name__)


def score_sets(metrics: Sequence[str], dir_a, dir_b, *, extractor=None, n_boot: int = 100, alpha: float = 0.05,
               seed: int = 0, batch_size: int = 64, cache_dir=None, device: str = "cpu", progress: bool = False,
               metric_kwargs: dict | None = None) -> dict[str, dict]:
    """{name: result} for set-vs-set metrics between folder A (reference) and folder B."""
    unknown = [m for m in metrics if m not in FEATURE_METRICS]
    if unknown:
        raise HarnessError(f"score_sets: {unknown} are not set-vs-set metrics; choose from {', '.join(FEATURE_METRICS)}")
    extractors: dict[str, object] = {}
    feats: dict[tuple[str, str], object] = {}
    out = {}
    for name in metrics:
        cls = get_metric_class(name)
        spec = extractor or cls.default_extractor  # each metric's own model unless one is given
        key = spec if isinstance(spec, str) else id(spec)
        if key not in extractors:
            extractors[key] = get_extractor(spec, device=device)
        # the metric builds the variant its reference uses (crop, normalisation): features per variant
        m = cls(extractors[key], seed=seed, **(metric_kwargs or {}).get(name, {}))
        ext = m.extractor
        for side, folder in (("a", dir_a), ("b", dir_b)):
            if (ext.identity, side) not in feats:
                feats[(ext.identity, side)] = folder_features(folder, ext, cache_dir=cache_dir,
                                                              batch_size=batch_size, progress=progress)
        m.update_features(feats[(ext.identity, "a")], real=True)
        m.update_features(feats[(ext.identity, "b")], real=False)
        res = m.compute_ci(n_boot=n_boot, alpha=alpha, seed=seed)
        out[name] = {**res, "dir_a": str(dir_a), "dir_b": str(dir_b), "seed": seed}
    return out


def read_prompts(path, files: list[Path]) -> list[str]:
    """Prompts for ``files``: a .txt (one line per image, sorted file order) or a .json/.jsonl mapping
    file names to prompts (objects with file_name/file/image and prompt/caption/text)."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        try:
            rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise HarnessError(f"{path}: not valid JSON ({e.msg})") from e
        if isinstance(rows, dict):
            rows = [{"file_name": k, "prompt": v} for k, v in rows.items()]
        by_name = {}
        for r in rows:
            f = next((r[k] for k in ("file_name", "file", "image") if k in r), None)
            p = next((r[k] for k in ("prompt", "caption", "text") if k in r), None)
            if f is None or p is None:
                raise HarnessError(f"{path}: each entry needs file_name and prompt, got keys {sorted(r)}")
            by_name[Path(f).name] = p
        missing = [f.name for f in files if f.name not in by_name]
        if missing:
            raise HarnessError(f"{path}: no prompt for {len(missing)} of {len(files)} images (e.g. {missing[0]})")
        prompts = [by_name[f.name] for f in files]
    if len(prompts) != len(files):
        raise HarnessError(f"{path}: {len(prompts)} prompts for {len(files)} images; "
                           "give exactly one prompt per image (lines match sorted file names)")
    return prompts


def score_clip(folder, prompts_file, *, model: str = "clip:ViT-B-32:openai", n_boot: int = 1000,
               alpha: float = 0.05, seed: int = 0, batch_size: int = 64, device: str = "cpu") -> dict:
    from harness.metrics.clip_score import CLIPScore

    files = list_images(folder)
    prompts = read_prompts(prompts_file, files)
    m = CLIPScore(model, device=device)
    for i in range(0, len(files), batch_size):
        m.update([load_image(f) for f in files[i:i + batch_size]], prompts[i:i + batch_size])
    res = m.compute_ci(n_boot=n_boot, alpha=alpha, seed=seed)
    res["files"] = [f.name for f in files]
    return {**res, "dir_a": str(folder), "prompts": str(prompts_file)}


def score_cluster_kl(od, tm, bm=None, *, detector, embedder: str = "clip:ViT-B-32:openai", conf: float = 0.25,
                     allow_pickle: bool = False, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                     batch_size: int = 32, device: str = "cpu", **kwargs) -> dict:
    """Cluster KL between folders OD (original data), TM (trained model) and optionally BM (base model)."""
    from harness.metrics.cluster_kl import ClusterKL
    from harness.metrics.detector import YoloDetector

    det = detector if callable(detector) else YoloDetector(detector, conf=conf, allow_pickle=allow_pickle,
                                                           device=device)
    emb = embedder if embedder == "detector" else get_extractor(embedder, device=device)
    m = ClusterKL(det, emb, conf=conf, seed=seed, **kwargs)
    for name, folder in (("od", od), ("bm", bm), ("tm", tm)):
        if folder is None:
            continue
        files = list_images(folder)
        for i in range(0, len(files), batch_size):
            m.update([load_image(f).convert("RGB") for f in files[i:i + batch_size]], name)
    res = m.compute_ci(n_boot=n_boot, alpha=alpha, seed=seed)
    return {**res, "dir_od": str(od), "dir_tm": str(tm), "dir_bm": None if bm is None else str(bm)}


def score(metric: str, dir_a, dir_b=None, *, extractor=None, prompts=None, **kwargs) -> dict:
    """Dispatch by metric name (the ``harness score`` API)."""
    get_metric_class(metric)  # unknown names fail here, listing the known ones
    if metric == "clip_score":
        if prompts is None:
            raise HarnessError("clip_score: needs a prompts file (--prompts FILE)")
        if dir_b is not None:
            raise HarnessError("clip_score: scores one folder against its prompts; got a second folder")
        return score_clip(dir_a, prompts, **({"model": extractor} if extractor else {}), **kwargs)
    if dir_b is None:
        raise HarnessError(f"{metric}: needs two folders (DIR_A DIR_B)")
    if metric == "cluster_kl":
        return score_cluster_kl(dir_a, dir_b, **({"embedder": extractor} if extractor else {}), **kwargs)
    if metric in FEATURE_METRICS:
        return score_sets([metric], dir_a, dir_b, extractor=extractor, **kwargs)[metric]
    raise HarnessError(f"{metric}: not scorable from folders with 'harness score'")
