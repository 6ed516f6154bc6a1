"""Training throughput: images/s and peak memory of the harness loop (full / LoRA, with and without the
latent+text cache) against a plain loop written the way diffusers' train_text_to_image.py example is.

    python benchmarks/train_throughput.py [--zoo DIR] [--steps 10] [--batch 8] [--resolution 64]
    python benchmarks/train_throughput.py --model sd15 --batch 1 --resolution 256 --steps 3 --warmup 1

``--model sd15`` trains the full-size SD 1.5 architecture with random weights (real FLOPs; on the CPU
a full fine-tune needs ~16 GB of RAM and seconds per step). ``benchmarks/train_flops.py`` gives the
most caching can save at full size, from FLOP counts.

Each configuration runs in its own process so peak memory is its own (CPU: peak RSS; GPU: peak
allocated). The first ``--warmup`` steps are excluded from images/s; the cache is filled before the
timed steps (its one-off cost is reported separately). Targets: cached >= 1.5x uncached, harness >= 1.0x
the reference loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.train_throughput")
sys.path.insert(0, str(REPO / "tests"))

CONFIGS = {
    "reference (diffusers example style)": {"reference": True},
    "full, no cache": {"data.cache_latents": False, "data.cache_text": False},
    "full, cached latents+text": {},
    "lora, no cache": {"lora.enabled": True, "data.cache_latents": False, "data.cache_text": False},
    "lora, cached latents+text": {"lora.enabled": True},
}


def harness_run(args, cfg: dict, work: Path) -> dict:
    from _train_helpers import overrides

    from harness.io import read_jsonl
    from harness.train.loop import train
    from harness.train.metrics_log import memory_stats
    from harness.train.recipe import load_recipe

    t0 = time.perf_counter()
    extra = {"train.max_steps": args.warmup + args.steps, "logging.every_steps": 1,
             "train.batch_size": args.batch, "validation.prompts": "[]", "validation.eval_metrics": "[]",
             "validation.at_start": False, "checkpoint.every_steps": 0, "checkpoint.single_file": False,
             "logging.timing": True, "train.lr": 1e-4, "train.warmup_steps": 0, **cfg}
    extra.update({"train.mixed_precision": args.mixed_precision,
                  "train.gradient_checkpointing": args.gradient_checkpointing})
    ov = overrides(Path(args.sd), work / "data", work / "run", work / "cache", **extra)
    ov = [o for o in ov if not o.startswith("data.resolution=")] + [f"data.resolution={args.resolution}"]
    train(load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ov))
    total = time.perf_counter() - t0
    timed = [m for m in read_jsonl(work / "run" / "metrics.jsonl") if "loss" in m][args.warmup:]
    seconds = sum(args.batch / m["images_per_s"] for m in timed)  # one record per step
    split = {k: sum(m[k] for m in timed) / len(timed) for k in timed[0] if k.startswith("time_") and k != "time_s"}
    return {"images_per_s": len(timed) * args.batch / seconds, "steps": len(timed), "wall_s_incl_setup": total,
            **split, **memory_stats(None)}


def reference_run(args, work: Path) -> dict:
    """The training step of diffusers' examples/text_to_image/train_text_to_image.py, minus its CLI."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler

    from harness.data.folder import scan_dataset
    from harness.data.loader import ImageCaptionDataset
    from harness.train.metrics_log import memory_stats

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(Path(args.sd))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae, text_encoder, unet, tok = pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ds = ImageCaptionDataset(scan_dataset(work / "data", split="train"), resolution=args.resolution)

    def collate(items):
        ids = tok([it["caption"] for it in items], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "input_ids": ids}

    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    lr_scheduler = get_scheduler("constant", optimizer)
    unet, optimizer, loader, lr_scheduler = acc.prepare(unet, optimizer, loader, lr_scheduler)
    # as the example does: frozen parts in the mixed-precision dtype, the trained UNet in fp32
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    vae.to(acc.device, dtype=weight_dtype)
    text_encoder.to(acc.device, dtype=weight_dtype)
    done, t_start = 0, None
    while done < args.warmup + args.steps:
        for batch in loader:
            if done == args.warmup:
                t_start = time.perf_counter()
            with acc.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                acc.backward(loss)
                acc.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            done += 1
            if done >= args.warmup + args.steps:
                break
    elapsed = time.perf_counter() - t_start
    return {"images_per_s": args.steps * args.batch / elapsed, "steps": done, **memory_stats(acc.device)}


def build_sd15(out: Path) -> Path:
    """The full-size SD 1.5 architecture with random fp32 weights, as a diffusers folder."""
    import torch

    from harness.models.tiny import build_random_sd15

    build_random_sd15(dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    return out


def one(args) -> None:
    cfg = CONFIGS[args.one]
    work = Path(args.work)
    out = reference_run(args, work) if cfg.get("reference") else harness_run(args, cfg, work)
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "sd15"], default="tiny",
                   help="the tiny zoo's SD, or the full-size SD 1.5 architecture with random weights")
    p.add_argument("--zoo", help="tiny zoo folder (built into a temp folder when absent)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--sd", help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the work folder (full-size runs write ~14 GB each)")
    args = p.parse_args()
    if args.one:
        return one(args)
    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    try:
        results = run_all(args, tmp)
    finally:
        # a full-size run leaves final weights and a checkpoint per configuration (~14 GB each):
        # never leave that behind unless asked
        if args.keep:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(args, results)


def run_all(args, tmp: Path) -> dict:
    from _train_helpers import make_dataset

    from harness.models.tiny import build_zoo

    if args.model == "sd15":
        args.sd = str(build_sd15(tmp / "sd15"))
    else:
        args.sd = str(Path(args.zoo or build_zoo(tmp / "zoo")) / "sd")
    make_dataset(tmp / "data", n_train=args.images, n_val=0, size=args.resolution)
    results = {}
    for name in CONFIGS:
        work = tmp / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("+", "_")
        work.mkdir()
        (work / "data").symlink_to(tmp / "data")
        cmd = [sys.executable, __file__, "--one", name, "--work", str(work), "--sd", args.sd,
               "--mixed-precision", args.mixed_precision, *(["--gradient-checkpointing"] * args.gradient_checkpointing),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
               "--resolution", str(args.resolution)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[0][7:])
        # each configuration as it finishes: a run cut short by a time limit still reports what it measured
        print(f"ROW {name}: {line[0][7:]}", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def print_table(args, results: dict) -> None:
    ref = results.get("reference (diffusers example style)", {}).get("images_per_s")
    device = "GPU" if any("gpu_peak_mib" in r for r in results.values()) else "CPU"
    print(f"\nbatch {args.batch}, {args.resolution} px, {args.steps} timed steps (+{args.warmup} warm-up), "
          f"{'SD 1.5 architecture, random weights' if args.model == 'sd15' else 'tiny zoo'}, {device}, "
          f"mixed precision {args.mixed_precision}, gradient checkpointing {args.gradient_checkpointing}")
    print(f"{'configuration':38s} {'images/s':>9s} {'vs ref':>7s} {'cached/uncached':>16s} {'peak MiB':>9s}  "
          f"time split (s/step)")
    for name, r in results.items():
        ips = r["images_per_s"]
        # the cache's speed-up is against the same mode (full or LoRA) without it
        unc = results.get(name.replace("cached latents+text", "no cache"), {}).get("images_per_s")
        peak = r.get("gpu_peak_mib", r.get("cpu_peak_mib", float("nan")))
        split = " ".join(f"{k[5:-2]}={v:.3f}" for k, v in r.items() if k.startswith("time_"))
        print(f"{name:38s} {ips:9.2f} {ips / ref if ref else float('nan'):7.2f} "
              f"{ips / unc if unc and 'cached' in name else float('nan'):16.2f} {peak:9.0f}  {split}")


if __name__ == "__main__":
    main()
