"""The GPU-only checks of the training loop, in one run sized for a lent GPU machine (about 6 min on
one H200, well inside a 10-minute call):

1. fp16 (accelerate's GradScaler on CUDA) and bf16 training on the tiny zoo's SD, full and LoRA: the loss
   is finite, the loss scale is logged, and the export is fp32 and loads in plain diffusers.
2. ``train_throughput.py --model sd15`` at 512 px (full-size SD 1.5 architecture, random weights):
   images/s and peak GPU memory, cached vs uncached, full vs LoRA, against the diffusers-example loop.

On this project's device machine (Python 3.12 with torch, accelerate, transformers and peft, but no
diffusers), once, in the repository root here::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1

then one device call, carrying ``.whl``::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --out $OUT

It writes ``device_check.json`` and the throughput tables under ``--out``. ``--precisions bf16
--sd15-resolution 0`` runs the first part alone, on the CPU too (what was checked without a GPU).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
log = logging.getLogger("benchmarks.device_check")


def environment() -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out.update(device=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda)
    return out


def tiny_run(sd: Path, data: Path, work: Path, precision: str, lora: bool) -> dict:
    """A short tiny-zoo run under ``precision``; what it logged and whether its export is fp32 and loads."""
    import torch
    from _train_helpers import overrides
    from diffusers import StableDiffusionPipeline

    from harness.io import read_jsonl
    from harness.train.loop import train
    from harness.train.recipe import load_recipe

    extra = {"train.mixed_precision": precision, "train.max_steps": 20, "validation.every_steps": 10,
             "validation.prompts": "['a cat']", "validation.eval_metrics": "[]", "checkpoint.every_steps": 10,
             "checkpoint.single_file": False, **({"lora.enabled": True} if lora else {})}
    out = work / f"{precision}-{'lora' if lora else 'full'}"
    t0 = time.perf_counter()
    try:
        final = train(load_recipe(REPO / "recipes" / "tiny-cpu.yaml",
                                  overrides(sd, data, out / "run", out / "cache", **extra)))
    except Exception as e:  # a check that fails is reported, and the others still run
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    logged = read_jsonl(out / "run" / "metrics.jsonl")
    steps = [m for m in logged if "loss" in m]
    pipe = StableDiffusionPipeline.from_pretrained(final)
    dtypes = sorted({str(p.dtype) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()})
    losses = [m["loss"] for m in steps]
    result = {"seconds": round(time.perf_counter() - t0, 1), "first_loss": losses[0], "last_loss": losses[-1],
              "val_loss": [m["val_loss"] for m in logged if "val_loss" in m],
              "loss_scale": [m.get("loss_scale") for m in steps], "skipped_steps": steps[-1].get("skipped_steps"),
              "export_dtypes": dtypes, "gpu_peak_mib": steps[-1].get("gpu_peak_mib")}
    result["ok"] = (all(math.isfinite(v) for v in losses) and dtypes == [str(torch.float32)]
                    and (precision != "fp16" or all(s is not None for s in result["loss_scale"])))
    return result


def throughput(args, precision: str) -> str:
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model", "sd15",
           "--resolution", str(args.sd15_resolution), "--batch", str(args.sd15_batch), "--steps", "8",
           "--warmup", "2", "--images", str(max(16, 2 * args.sd15_batch)), "--mixed-precision", precision]
    # its own process group: at the time limit SIGINT reaches the configuration running too, and the
    # benchmark's clean-up (up to ~14 GB of weights per configuration) still runs
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.sd15_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        # the configurations measured so far (ROW lines) still count
        return out + f"\n[stopped after {args.sd15_timeout} s]\n"
    return out + (f"\n[exit {proc.returncode}]\n{err[-3000:]}" if proc.returncode else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--sd15-resolution", type=int, default=512, help="0 skips the full-size throughput part")
    p.add_argument("--sd15-batch", type=int, default=4)
    p.add_argument("--sd15-precisions", default="fp16")
    p.add_argument("--sd15-timeout", type=int, default=420)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "tiny": {}}
    log.info("%s", report["environment"])
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        from _train_helpers import make_dataset

        from harness.io import atomic_write_json
        from harness.models.tiny import build_tiny_sd

        sd = Path(tmp) / "sd"
        build_tiny_sd(seed=0).save_pretrained(sd)
        data = make_dataset(Path(tmp) / "data", n_train=8, n_val=2)
        for precision in args.precisions.split(","):
            for lora in (False, True):
                name = f"{precision}-{'lora' if lora else 'full'}"
                report["tiny"][name] = tiny_run(sd, data, Path(tmp), precision, lora)
                log.info("%s: %s", name, report["tiny"][name])
                atomic_write_json(out / "device_check.json", report)  # after each run: a cut-short call keeps them
    if args.sd15_resolution:
        for precision in args.sd15_precisions.split(","):
            table = throughput(args, precision)
            (out / f"throughput-sd15-{args.sd15_resolution}-{precision}.txt").write_text(table)
            log.info("\n%s", table)


if __name__ == "__main__":
    main()
