"""``harness demo``: caption -> fine-tune -> eval -> report on the digits world, on a CPU."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run the whole loop on real (tiny) models trained on handwritten digits: caption "
                          "restyled held-out digits, fine-tune the base on them, evaluate base vs fine-tune, "
                          "write the HTML report. The default world ships with the package; other seeds and scales are "
                          "built on first use (minutes on two cores) and cached.")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; rerun to resume)")
    parser.add_argument("--seed", type=int, default=0, help="the digits world's seed (default 0)")
    parser.add_argument("--world", metavar="DIR", help="digits world folder (default: a cache folder keyed by "
                        "seed and settings, under $HARNESS_CACHE or ~/.cache/harness)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every training length of the world build (default 1; 0.3 for a quick look)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build the world from scratch (into an absent --world folder or cache folder) "
                             "instead of installing the shipped copy")


def run(args: argparse.Namespace) -> int:
    from harness.world.demo import run_demo
    from harness.world.digits import WorldConfig

    res = run_demo(args.out, cfg=WorldConfig(seed=args.seed).scaled(args.scale), world_dir=args.world,
                   rebuild=args.rebuild)
    print(f"report: {res.report}")
    print(res.summary)
    return 0
