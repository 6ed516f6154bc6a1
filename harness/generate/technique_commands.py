"""``harness technique inpaint|anagram|hybrid|interpolate``: image techniques on top of the sampler."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.generate.commands import add_model_args, add_sampling_args, seeds_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="technique", required=True, metavar="TECHNIQUE")
    s = sub.add_parser("inpaint", help="regenerate the white part of a mask, keep the rest")
    s.add_argument("image")
    s.add_argument("--mask", required=True, help="mask image, same size as the image; white = regenerate")
    s.add_argument("--prompt", required=True)
    s = sub.add_parser("anagram", help="an image that reads as prompt A upright and prompt B flipped")
    s.add_argument("--prompt", required=True)
    s.add_argument("--prompt-b", required=True)
    s.add_argument("--view", default="vflip", choices=["vflip", "hflip", "rot180"])
    s = sub.add_parser("hybrid", help="prompt A in the low frequencies, prompt B in the high ones")
    s.add_argument("--prompt", required=True, help="low-frequency prompt (seen from afar)")
    s.add_argument("--prompt-b", required=True, help="high-frequency prompt (seen up close)")
    s.add_argument("--sigma", type=float, default=2.0, help="low-pass Gaussian sigma in latent pixels")
    s = sub.add_parser("interpolate", help="slerp between two seeds' starting noise")
    s.add_argument("--prompt", required=True)
    s.add_argument("--seed-b", type=int, required=True)
    s.add_argument("--frames", type=int, default=5)
    for s in sub.choices.values():
        s.add_argument("--seeds", type=seeds_arg, default=[0], help="seeds (interpolate: the first is seed A)")
        s.add_argument("--out", required=True)
        add_model_args(s)
        add_sampling_args(s, size=s.prog.split()[-1] != "inpaint")


def run(args) -> int:
    from harness.generate import techniques as T
    from harness.generate.batch import save_png
    from harness.generate.commands import load_model
    from harness.generate.sample import to_pil

    pipe = load_model(args)
    common = dict(steps=args.steps, guidance_scale=args.cfg, negative_prompt=args.negative,
                  scheduler=args.scheduler)
    size = {} if args.technique == "inpaint" else dict(width=args.width, height=args.height)
    if args.technique == "inpaint":
        res = T.inpaint(pipe, args.image, args.mask, args.prompt, seeds=args.seeds, **common)
    elif args.technique == "anagram":
        res = T.anagram(pipe, args.prompt, args.prompt_b, seeds=args.seeds, view=args.view, **common, **size)
    elif args.technique == "hybrid":
        res = T.hybrid(pipe, args.prompt, args.prompt_b, seeds=args.seeds, sigma=args.sigma, **common, **size)
    else:
        res = T.interpolate(pipe, args.prompt, args.seeds[0], args.seed_b, frames=args.frames, **common, **size)
    images = to_pil(res.images)
    params = {k: v for k, v in vars(args).items() if k not in ("func",) and not callable(v)}
    out = Path(args.out)
    for i, im in enumerate(images):
        save_png(out / f"{args.technique}_{i:03d}.png", im,
                 {**params, "index": i, "checkpoint": args.model, "seed": args.seeds[min(i, len(args.seeds) - 1)],
                  "guidance_scale": args.cfg, "width": im.width, "height": im.height})
    print(f"{len(images)} images in {out}")
    return 0
