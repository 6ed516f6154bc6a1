"""A 4x4 CFG x seed grid: one batched denoising loop vs one diffusers pipeline call per cell.

    python benchmarks/grid_throughput.py                       # tiny zoo model, 64 px, 20 steps, CPU
    python benchmarks/grid_throughput.py --model runwayml/stable-diffusion-v1-5 --size 512 --device cuda

Both sides draw each cell's noise from a CPU generator seeded with the cell's seed, so they make the
same images; the table also reports the largest pixel difference between them. Target: batched >= 2x.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

CFGS = (1.5, 4.0, 7.0, 10.0)
SEEDS = (0, 1, 2, 3)


def per_cell(pipe, prompt: str, steps: int, size: int) -> torch.Tensor:
    out = []
    for cfg in CFGS:
        for seed in SEEDS:
            g = torch.Generator("cpu").manual_seed(seed)
            out.append(pipe(prompt, guidance_scale=cfg, num_inference_steps=steps, width=size, height=size,
                            generator=g, output_type="pt").images.float().cpu())
    return torch.cat(out)


def batched(pipe, prompt: str, steps: int, size: int) -> torch.Tensor:
    from harness.generate.sample import Sample, denoise

    samples = [Sample(prompt, seed=s, guidance_scale=c, steps=steps) for c in CFGS for s in SEEDS]
    return denoise(pipe, samples, width=size, height=size).images


def grid_end_to_end(cache, model: str, prompt: str, steps: int, size: int, out: Path) -> None:
    from harness.generate.grid import GridSpec, run_grid

    spec = GridSpec(checkpoint=model, prompt=prompt, x="cfg=" + ",".join(map(str, CFGS)),
                    y="seed=" + ",".join(map(str, SEEDS)), steps=steps, width=size, height=size, batch_size=16)
    run_grid(spec, out, progress=False, cache=cache)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: build the tiny zoo model in a temp folder)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", default="a photo of a red cat")
    args = ap.parse_args()

    from harness.generate.pipes import PipelineCache

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from harness.models.tiny import build_zoo

            build_zoo(Path(tmp) / "zoo", seed=0)
            model = str(Path(tmp) / "zoo" / "sd")
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        cache = PipelineCache(device=args.device, dtype=dtype)
        pipe = cache.get(model)
        pipe.set_progress_bar_config(disable=True)
        # warm up both paths once (allocator, kernels), then time each once
        pipe(args.prompt, num_inference_steps=2, width=args.size, height=args.size)
        from harness.generate.sample import Sample, denoise

        denoise(pipe, [Sample(args.prompt, 0, steps=2)], width=args.size, height=args.size)
        t_cell, ref = timed(lambda: per_cell(pipe, args.prompt, args.steps, args.size))
        t_batch, ours = timed(lambda: batched(pipe, args.prompt, args.steps, args.size))
        t_grid, _ = timed(lambda: grid_end_to_end(cache, model, args.prompt, args.steps, args.size,
                                                  Path(tmp) / "grid"))
    diff = float((ref - ours).abs().max())
    n = len(CFGS) * len(SEEDS)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"4x4 CFG x seed grid, {args.steps} steps, {args.size}px, {dev}, model {args.model or 'tiny zoo'}")
    print(f"{'method':<40} {'seconds':>9} {'img/s':>8} {'speedup':>8}")
    for name, t in (("one pipeline call per cell (baseline)", t_cell), ("batched denoise (16 in one loop)", t_batch),
                    ("harness grid end to end (+PNGs, drawing)", t_grid)):
        print(f"{name:<40} {t:9.2f} {n / t:8.2f} {t_cell / t:7.2f}x")
    print(f"max |pixel difference| batched vs per-cell: {diff:.2e} (of 1.0)")


if __name__ == "__main__":
    main()
