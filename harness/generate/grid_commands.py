"""``harness grid``: x/y/z comparison grids (CFG, steps, scheduler, checkpoint, seed, prompt, ...)."""

from __future__ import annotations

import argparse
import dataclasses

from harness.generate.commands import seeds_arg

_EPILOG = """axes: cfg, steps, scheduler, checkpoint, seed, prompt, prompt_sr, negative, lora_scale, width, height,
size. Values: '1,4,7', '10-30 (+10)', '1-2 [5]' (5 values), '[a cat, "b, c"]', prompt_sr=cat,dog,bird
(replace 'cat' in the prompt). Example:
  harness grid --model M --prompt "a cat" --x "cfg=1,4,7" --y "steps=10-30 (+10)" --z "scheduler=ddim,euler" --out g"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = _EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--spec", help="YAML grid spec (keys of GridSpec); command-line options override it")
    p.add_argument("--model", help="checkpoint (or put checkpoints on an axis)")
    p.add_argument("--prompt", help="prompt (or put prompts on an axis)")
    p.add_argument("--x", help="x axis, e.g. 'cfg=1,4,7'")
    p.add_argument("--y", help="y axis, e.g. 'steps=10-30 (+10)'")
    p.add_argument("--z", help="z axis: one grid per value plus an overview")
    p.add_argument("--seeds", type=seeds_arg, help="seeds per cell; every image is kept (default 0)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--cfg", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--scheduler")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--lora")
    p.add_argument("--lora-scale", type=float)
    p.add_argument("--max-cells", type=int, help="confirm a grid with more images than this (default 100)")
    p.add_argument("--batch-size", type=int, help="images per denoising batch (default 8)")
    p.add_argument("--max-grid-px", type=int, help="largest side of one grid image; larger grids are paged")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--allow-pickle", action="store_true")


_MAP = {"model": "checkpoint", "negative": "negative_prompt"}


def run(args) -> int:
    from harness.config import from_dict, read_yaml
    from harness.generate.commands import dtype_of
    from harness.generate.grid import GridSpec, run_grid

    data = read_yaml(args.spec) if args.spec else {}
    for f in ("model", "prompt", "x", "y", "z", "seeds", "negative", "cfg", "steps", "scheduler", "width",
              "height", "lora", "lora_scale", "max_cells", "batch_size", "max_grid_px"):
        v = getattr(args, f)
        if v is not None:
            data[_MAP.get(f, f)] = list(v) if isinstance(v, list) else v
    spec = from_dict(GridSpec, data, where=args.spec or "command line")
    assert dataclasses.is_dataclass(spec)
    res = run_grid(spec, args.out, device=args.device, dtype=dtype_of(args), allow_pickle=args.allow_pickle)
    files = [p["file"] for p in res["pages"]] + ([res["overview"]] if res["overview"] else [])
    print(f"{len(res['cells'])} cells, {res['counts']['generated']} images generated: {', '.join(files)} "
          f"in {args.out}")
    return 0
