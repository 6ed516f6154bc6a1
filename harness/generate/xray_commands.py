"""``harness xray``: record every denoising step (stats, predicted x0, previews) as JSON + a strip."""

from __future__ import annotations

import argparse

from harness.generate.commands import add_model_args, add_sampling_args, seeds_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--seeds", type=seeds_arg, default=[0], help="seeds (default 0)")
    p.add_argument("--vae-every", type=int, default=5,
                   help="VAE-decode the predicted x0 every N steps and at the last (0: linear previews only)")
    p.add_argument("--out", required=True)
    add_model_args(p)
    add_sampling_args(p)


def run(args) -> int:
    from harness.generate.commands import load_model
    from harness.generate.xray import xray

    pipe = load_model(args)
    traces = xray(pipe, args.prompt, out=args.out, seeds=args.seeds, steps=args.steps, guidance_scale=args.cfg,
                  negative_prompt=args.negative, scheduler=args.scheduler, width=args.width, height=args.height,
                  vae_every=args.vae_every, checkpoint=args.model)
    print(f"{len(traces)} traces ({traces[0]['num_steps']} steps each) in {args.out}")
    return 0
