"""``harness refine``: SDEdit late-step refinement of existing images, optionally as a strength sweep."""

from __future__ import annotations

import argparse

from harness.generate.commands import add_model_args, add_sampling_args


def _floats(text: str) -> list[float]:
    from harness.generate.axes import expand_range

    return [float(v) for item in text.split(",") for v in expand_range(item, "float", "--strength")]


def _expert(text: str):
    from harness.errors import ConfigError
    from harness.generate.experts import parse_expert

    try:
        return parse_expert(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="RGB images (sides multiples of 8)")
    p.add_argument("--prompt", required=True)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--strength", type=_floats, default=[0.3],
                       help="fraction of the schedule to re-run; several make a sweep: '0.2,0.4' or '0.1-0.5 [5]'")
    start.add_argument("--timestep", type=int, help="start at this noise level instead (0-999, e.g. 500)")
    p.add_argument("--expert", action="append", type=_expert, default=[], metavar="CKPT:LO-HI",
                   help="a UNet that owns timesteps LO <= t < HI (repeat for a chain, e.g. --expert runs/a/final:250-500 "
                        "--expert runs/b/final:0-250); --model runs every timestep no expert owns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    add_model_args(p)
    add_sampling_args(p, size=False)


def run(args) -> int:
    from harness.generate.commands import load_model
    from harness.generate.refine import refine_to_dir

    pipe = load_model(args)
    if args.expert:
        from harness.generate.commands import dtype_of
        from harness.generate.experts import attach_experts

        attach_experts(pipe, args.expert, device=args.device, dtype=dtype_of(args), allow_pickle=args.allow_pickle)
    res = refine_to_dir(pipe, args.images, args.prompt, args.out, strengths=args.strength, timestep=args.timestep,
                        seed=args.seed, steps=args.steps, guidance_scale=args.cfg, negative_prompt=args.negative,
                        scheduler=args.scheduler)
    print(f"{len(res['images'])} refined images and {res['sweep']} in {args.out}")
    return 0
