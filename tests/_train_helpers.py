"""Small real-image datasets and recipe helpers for the training tests (32-64 px photos from skimage)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "moon", "horse", "hubble_deep_field",
          "immunohistochemistry", "retina", "page")
CAPTIONS = ("an astronaut", "a cup of coffee", "a cat", "a rocket", "old coins", "a man with a camera",
            "the moon", "a horse", "galaxies", "cells", "a retina", "a page of text")
REPO = Path(__file__).resolve().parents[1]


def photo(name: str, size: int) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(arr.max(), 1))).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def make_dataset(root: Path, n_train: int = 8, n_val: int = 2, size: int = 32, captions: bool = True) -> Path:
    """``root/train/*.png`` and ``root/val/*.png`` with ``.txt`` caption sidecars."""
    for split, names in (("train", range(n_train)), ("val", range(n_train, n_train + n_val))):
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        for i in names:
            k = i % len(PHOTOS)
            img = photo(PHOTOS[k], size)
            if i >= len(PHOTOS):  # more images than photos: vary the copy so every file is distinct
                img = img.rotate(90 * (i // len(PHOTOS)))
            img.save(d / f"img{i:03d}.png")
            if captions:
                (d / f"img{i:03d}.txt").write_text(CAPTIONS[k])
    return root


def overrides(sd_dir: Path, data_dir: Path, out_dir: Path, cache_dir: Path, **extra) -> list[str]:
    """The key=value list that points a recipe at the tiny zoo and tiny data, with quick settings."""
    base = {"model.source": sd_dir, "data.root": data_dir, "output_dir": out_dir, "data.cache_dir": cache_dir,
            "data.resolution": 32, "logging.trackers": "[]", "logging.every_steps": 1,
            "validation.num_inference_steps": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def quick_recipe(sd_dir: Path, data_dir: Path, tmp_path: Path, **extra):
    """tiny-cpu.yaml on the tiny zoo, 2 steps, no samples or scorers, no checkpoint before the end."""
    from harness.train.recipe import load_recipe

    base = {"train.max_steps": 2, "validation.prompts": "[]", "validation.eval_metrics": "[]",
            "checkpoint.every_steps": 0, **extra}
    return load_recipe(REPO / "recipes" / "tiny-cpu.yaml",
                       overrides(sd_dir, data_dir, tmp_path / "run", tmp_path / "cache", **base))


def launch_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    """A port nothing listens on now: the launchers' default 29500 is shared with any other job on the
    machine (a second test session, a user's training), and a taken port fails the launch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(num_processes: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    # accelerate's --cpu flag starts one process whatever --num_processes says; --multi_gpu with a CPU-only
    # Accelerator gives real multi-process CPU (gloo) training.
    cmd += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    return [*cmd, "-m", "harness.train"]


def run_launch(args: list[str], num_processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*accelerate_cmd(num_processes), *map(str, args)], env=launch_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def fp16_on_cpu(monkeypatch, **scaler_kwargs) -> None:
    """accelerate's fp16 set-up of a GPU run (native fp16 autocast and a GradScaler), on the CPU.

    accelerate makes the scaler only on accelerators; torch's CPU autocast and ``GradScaler("cpu")`` run
    fp16 and loss scaling on the CPU. The Accelerator harness.train builds gets them exactly where
    accelerate would have put them on a GPU (``native_amp``, ``scaler``), so everything after that (the
    autocast wrapped around the prepared model's forward, ``backward`` scaling the loss, unscaling before
    clipping, skipping an overflowed step, the scaler in ``save_state``/``load_state``) is accelerate's
    and torch's own code. ``scaler_kwargs`` go to the GradScaler (init_scale, backoff_factor, ...)."""
    import accelerate

    base = accelerate.Accelerator

    class FP16OnCPU(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16" and self.scaler is None:
                cpu_loss_scaling(self, **scaler_kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", FP16OnCPU)


def cpu_loss_scaling(acc, **scaler_kwargs) -> None:
    """What accelerate's Accelerator sets for fp16 on a GPU, with torch's CPU GradScaler."""
    import torch

    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
