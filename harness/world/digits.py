"""The digits world: real, CPU-trainable models for every stage of the harness.

scikit-learn ships 1,797 real 8x8 scans of handwritten digits. Upscaled to 32x32 RGB they are enough
to train, in minutes on two CPU cores, an SD-1.5-shaped text-to-image pipeline (AutoencoderKL,
CLIPTextModel with the real CLIP tokenizer, cross-attention UNet2DConditionModel, DDPM schedule)
plus the "judges" the metrics need: a CLIP, a BLIP captioner, a YOLO detector and an artifact
estimator. The denoiser and text encoder only ever see black-on-white digits captioned
"a handwritten digit seven"; the judges see several inks and papers with captions that name them,
so they can recognise a style (red ink on cream paper) the base model has never drawn. The
autoencoder sees random colours: like SD's VAE it is a general image codec, which a style
fine-tune of the UNet needs in order to express a colour at all.

Everything is deterministic for a seed (on a given machine and thread count) and cached in a folder
keyed by the seed and every knob (:func:`digits_world`).

This module builds and caches the world from its parts: the config (:mod:`.digits_config`), the data
and styles (:mod:`.digits_data`), the base pipeline (:mod:`.digits_sd`) and the judges
(:mod:`.digits_judges`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.io import atomic_dir, atomic_write_json
from harness.world.digits_config import WORLD_VERSION, WorldConfig
from harness.world.digits_data import IMAGE_SIZE, load_ink, planted_digits, split_indices
from harness.world.digits_judges import TINY_DIGITS_CLIP, train_blip, train_clip, train_yolo
from harness.world.digits_sd import build_base

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- world
PARTS = ("sd", "clip", "blip", "yolo", "estimator")


def default_cache_dir(cfg: WorldConfig) -> Path:
    root = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))
    return root / f"digits-{cfg.seed}-{cfg.key()}"


# Parts that need neither the base pipeline nor each other. With two or more cores they train in a
# second process while the UNet trains: the tiny UNet gains little from a second thread, the VAE ~75%,
# so the VAE gets every thread and the UNet's first steps share the cores with these. The UNet takes
# all threads back at a fixed step, not when the other process ends, so the world stays deterministic
# (results depend on the thread count). On 2 idle cores the side parts take ~170 s, ~270 UNet steps.
SIDE_PARTS = ("clip", "blip", "yolo")
SIDE_META = "world-side.json"
SIDE_UNET_FRACTION = 0.25  # of the UNet's steps trained with half the threads


def build_world(out: str | Path, cfg: WorldConfig | None = None, *, overwrite: bool = False,
                parts: tuple[str, ...] = PARTS, jobs: int | None = None, meta_name: str = "world.json") -> Path:
    """``harness zoo build digits``: write OUT/sd, OUT/clip, OUT/blip, OUT/yolo, OUT/estimator.

    Each part is written atomically and skipped when already complete, so a killed build resumes;
    ``world.json`` records the config, the time each part took and its sanity numbers. ``jobs`` (default:
    2 when the machine has two cores) > 1 builds :data:`SIDE_PARTS` in a second process beside the UNet."""
    cfg = cfg or WorldConfig()
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise HarnessError(f"digits world: unknown part(s) {unknown}; known: {list(PARTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / meta_name
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("config", asdict(cfg)) != asdict(cfg) and not overwrite:
        raise HarnessError(f"{out}: holds a digits world built with another config; pass overwrite or use "
                           f"another folder")
    meta.update({"kind": "digits", "version": WORLD_VERSION, "config": asdict(cfg), "key": cfg.key()})
    meta.setdefault("parts", {})
    # A part that failed for this config (a short build's estimator) would fail again: not retried.
    todo = [n for n in parts if overwrite or not ((out / n).exists() or "failed" in meta["parts"].get(n, {}))]
    jobs = (2 if (os.cpu_count() or 1) >= 2 else 1) if jobs is None else jobs
    side = [n for n in todo if n in SIDE_PARTS] if jobs > 1 and "sd" in todo else []
    helper = _SideBuild(out, cfg, side, overwrite)
    ink, y = load_ink()
    train, _ = split_indices(len(y), cfg.seed)
    builders = {
        "sd": lambda d: build_base(cfg, d, after_vae=helper.start if side else None,
                                   threads_at=helper.threads_at if side else None),
        "clip": lambda d: _build_clip(cfg, ink[train], y[train], d),
        "blip": lambda d: _build_blip(cfg, ink[train], y[train], d),
        "yolo": lambda d: train_yolo(cfg, ink[train], y[train], d) and {},
        "estimator": lambda d: _build_estimator(cfg, out / "sd", d),
    }
    try:
        for name in todo:
            if name in side:
                continue
            log.info("digits world: training %s -> %s", name, out / name)
            t0 = time.perf_counter()
            try:
                with atomic_dir(out / name, overwrite=overwrite) as tmp:
                    info = builders[name](tmp) or {}
            except HarnessError as e:
                if name != "estimator":
                    raise
                # A short (test-sized) build may not train an estimator that beats the mean; the demo
                # then skips the artifact score instead of scoring with a collapsed model.
                log.warning("digits world: no artifact estimator: %s", e)
                info = {"failed": str(e)}
            meta["parts"][name] = {**info, "seconds": round(time.perf_counter() - t0, 1)}
            atomic_write_json(meta_path, meta)
    except BaseException:
        helper.stop()  # its parts are atomic: a stopped build leaves nothing half-written to resume from
        raise
    meta["parts"].update(helper.join().get("parts", {}))
    atomic_write_json(meta_path, meta)
    return out


class _SideBuild:
    """:data:`SIDE_PARTS` built by ``build_world(jobs=1)`` in a spawned process, one thread on each side."""

    def __init__(self, out: Path, cfg: WorldConfig, parts: list[str], overwrite: bool):
        self.out, self.cfg, self.parts, self.overwrite = out, cfg, parts, overwrite
        self.proc, self.threads = None, torch.get_num_threads()

    def start(self) -> None:
        import multiprocessing

        half = max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(half)
        log.info("digits world: training %s in a second process (%d thread(s) each)", ", ".join(self.parts), half)
        ctx = multiprocessing.get_context("spawn")  # a fork would inherit torch's thread pools
        self.proc = ctx.Process(target=_side_main, args=(str(self.out), asdict(self.cfg), self.parts,
                                                          self.overwrite, half, logging.getLogger().level))
        self.proc.start()

    def threads_at(self, step: int) -> int | None:
        """The UNet's thread count from ``step`` on, when it changes (see SIDE_UNET_FRACTION)."""
        if step == int(self.cfg.unet_steps * SIDE_UNET_FRACTION):
            log.info("digits world: UNet step %d: back to %d thread(s)", step, self.threads)
            return self.threads
        return None

    def stop(self) -> None:
        torch.set_num_threads(self.threads)
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()

    def join(self) -> dict:
        torch.set_num_threads(self.threads)
        if self.proc is None:
            return {}
        self.proc.join()
        if self.proc.exitcode != 0:
            raise HarnessError(f"digits world: the process building {', '.join(self.parts)} failed (exit code "
                               f"{self.proc.exitcode}; its log is above); run the build again to resume")
        path = self.out / SIDE_META
        side = json.loads(path.read_text()) if path.exists() else {}
        path.unlink(missing_ok=True)
        for info in side.get("parts", {}).values():
            info["process"] = "second"  # provenance: trained beside the UNet, one thread
        return side


def _side_main(out: str, cfg: dict, parts: list[str], overwrite: bool, threads: int, level: int) -> None:
    from harness.log import setup

    setup(quiet=level > logging.INFO)
    torch.set_num_threads(threads)
    build_world(out, WorldConfig(**cfg), overwrite=overwrite, parts=tuple(parts), jobs=1, meta_name=SIDE_META)


def digits_world(cfg: WorldConfig | None = None, cache_dir: str | Path | None = None,
                 parts: tuple[str, ...] = PARTS, *, rebuild: bool = False) -> Path:
    """The cached digits world for ``cfg``: the shipped copy when one ships for its key (seconds), else
    built on first use (~15 minutes on two CPU cores). ``rebuild`` builds from scratch into an absent
    folder and never installs the shipped copy."""
    from harness.world import shipped

    cfg = cfg or WorldConfig()
    out = Path(cache_dir) if cache_dir else default_cache_dir(cfg)
    if rebuild and out.exists() and any(out.iterdir()):
        raise HarnessError(f"{out}: a digits world is already there; --rebuild builds into an absent or empty "
                           "folder (remove it or pass another --world)")
    if not rebuild:
        shipped.install(cfg.seed, cfg.key(), out)
    return build_world(out, cfg, parts=parts)


def _build_clip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray, d: Path) -> dict:
    from harness.models.tiny import save_open_clip

    model = train_clip(cfg, ink, labels)
    save_open_clip(model, d, TINY_DIGITS_CLIP, IMAGE_SIZE)
    return {}


def _build_blip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray, d: Path) -> dict:
    model, processor = train_blip(cfg, ink, labels)
    model.save_pretrained(str(d))
    processor.save_pretrained(str(d))
    return {}


def _build_estimator(cfg: WorldConfig, sd_dir: Path, d: Path) -> dict:
    """The project's artifact estimator (harness.estimator), trained on digits with planted artifacts,
    on the world's VAE previews and CLIP."""
    import tempfile

    from harness.estimator.dataset import build_dataset
    from harness.estimator.train import train_estimator

    ink, y = load_ink()
    train, _ = split_indices(len(y), cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        table = planted_digits(Path(tmp) / "images", 600, cfg.seed + 60, ink[train], y[train])
        ds = build_dataset(table, Path(tmp) / "ds", vae_source=sd_dir, timesteps=(0, 400), draws=1,
                           seed=cfg.seed, preview_kind="vae", image_size=IMAGE_SIZE, preview_size=IMAGE_SIZE)
        result = train_estimator(ds, d, clip=f"local-dir:{sd_dir.parent / 'clip'}", head="ordinal",
                                 steps=cfg.estimator_steps, warmup=min(30, cfg.estimator_steps // 10),
                                 seed=cfg.seed, finetune_clip=False)
    final = result.metrics["per_timestep"]
    return {"heldout": final}


def build_digits_zoo(out: str | Path, *, seed: int = 0, overwrite: bool = False, scale: float = 1.0) -> Path:
    """The ``digits`` kind of ``harness zoo build``."""
    return build_world(out, WorldConfig(seed=seed).scaled(scale), overwrite=overwrite)
