"""The ``harness`` command: a thin dispatcher.

Each command lives with its stage in ``harness/<stage>/commands.py``, which defines
``add_arguments(parser)`` and ``run(args) -> int``; those functions turn arguments into plain
keyword calls of the stage's library API. Modules are imported only for the command being run, so
``harness --help`` stays fast (``import diffusers`` alone takes seconds).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help). Order is the order shown in --help (the loop's order).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("harness.world.demo_commands", "the whole loop on a CPU: caption, fine-tune, eval, report (digits)"),
    "info": ("harness.models.commands", "describe a checkpoint: source, components, sizes, scheduler"),
    "zoo": ("harness.world.zoo_commands", "build the tiny model zoo (random or trained on digits)"),
    "export": ("harness.models.export_commands", "save a checkpoint as a diffusers folder and/or one .safetensors"),
    "caption": ("harness.caption.commands", "BLIP captions for the images in a dataset folder that have none"),
    "split": ("harness.data.split_commands", "hash-based train/val split written into metadata.jsonl"),
    "data": ("harness.data.commands", "inspect a dataset folder: 'harness data stats DIR'"),
    "estimator": ("harness.estimator.commands", "learned artifact estimator: build | train | score"),
    "train": ("harness.train.commands", "fine-tune from a YAML recipe (also: accelerate launch -m harness.train)"),
    "generate": ("harness.generate.commands", "generate images: prompts x seeds x checkpoints (resumable)"),
    "grid": ("harness.generate.grid_commands", "x/y/z comparison grids over cfg, steps, scheduler, checkpoint, ..."),
    "refine": ("harness.generate.refine_commands", "SDEdit late-step refinement of images (strength sweeps)"),
    "xray": ("harness.generate.xray_commands", "record every denoising step: latent stats, predicted x0, previews"),
    "technique": ("harness.generate.technique_commands", "inpaint | anagram | hybrid | interpolate"),
    "score": ("harness.metrics.commands", "score image folders: FID/KID/CMMD/PRDC, CLIP score, cluster KL, with CIs"),
    "eval": ("harness.report.commands", "run an eval suite: base vs candidates, metrics with CIs, gates, report"),
    "report": ("harness.report.commands", "(re)write the HTML report of an eval run folder"),
    "compare": ("harness.report.commands", "compare several eval runs in one table and a metric-vs-step plot"),
}

log = logging.getLogger("harness")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Fine-tune Stable Diffusion 1.5 checkpoints and find out whether the fine-tune is better.",
        epilog="Run 'harness COMMAND --help' for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: library logs too)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[name][0])
    p = argparse.ArgumentParser(prog=f"harness {name}", description=COMMANDS[name][1])
    module.add_arguments(p)
    return p, module


def main(argv: list[str] | None = None) -> int:
    from harness.errors import HarnessError
    from harness.log import setup

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Split global flags from the command and its own arguments.
    globals_, rest = [], []
    for i, a in enumerate(argv):
        if a in COMMANDS:
            rest = argv[i:]
            break
        globals_.append(a)
    gargs = parser.parse_args(globals_)
    if not rest:
        parser.print_help()
        return 0 if not globals_ or "-h" in globals_ or "--help" in globals_ else 2
    setup(gargs.verbose, gargs.quiet)
    name = rest[0]
    try:
        cparser, module = _command_parser(name)
        args = cparser.parse_args(rest[1:])
        return int(module.run(args) or 0)
    except HarnessError as e:
        if gargs.debug or os.environ.get("HARNESS_DEBUG"):
            raise
        print(f"harness {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harness {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
