"""``harness generate``: prompts x seeds x checkpoints -> PNGs + generations.jsonl (resumable).

Also holds the argument groups the other generation commands share."""

from __future__ import annotations

import argparse


def seeds_arg(text: str) -> list[int]:
    """``"1,2,3"``, ``"0-7"``, ``"0-30 (+10)"`` -> seeds (same syntax as a seed axis)."""
    from harness.generate.axes import parse_axis

    return list(parse_axis(f"seed={text}").values)


def add_model_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    g = p.add_argument_group("model")
    if multiple:
        g.add_argument("--model", action="append", required=True, metavar="CKPT",
                       help="hub id, diffusers folder or .safetensors (repeat for several checkpoints)")
    else:
        g.add_argument("--model", required=True, metavar="CKPT", help="hub id, diffusers folder or .safetensors")
    g.add_argument("--lora", default=None, help="LoRA weights fused into the model")
    g.add_argument("--lora-scale", type=float, default=None, help="LoRA scale (default 1)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: fp16 on GPU, fp32 on CPU")
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt weights (runs pickled code)")


def add_sampling_args(p: argparse.ArgumentParser, size: bool = True) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--scheduler", default=None,
                   help="ddim, euler, euler_a, dpm++, dpm++_karras, pndm, ddpm, lms, heun, unipc, deis "
                        "(default: the checkpoint's own)")
    if size:
        g.add_argument("--width", type=int, default=512)
        g.add_argument("--height", type=int, default=512)


def dtype_of(args):
    from harness.models.load import parse_dtype

    return parse_dtype(args.dtype) if args.dtype else None


def load_model(args):
    from harness.generate.pipes import load

    return load(args.model, device=args.device, dtype=dtype_of(args), lora=args.lora, lora_scale=args.lora_scale,
                allow_pickle=args.allow_pickle)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts", help="text file with one prompt per line ('#' comments)")
    p.add_argument("--seeds", type=seeds_arg, default=[0], help="seeds, e.g. '0-7' or '1,5,9' (default 0)")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--batch-size", type=int, default=8, help="images per denoising batch (default 8)")
    add_model_args(p, multiple=True)
    add_sampling_args(p)


def run(args) -> int:
    from harness.generate.batch import generate, read_prompts

    prompts = args.prompt if args.prompt else read_prompts(args.prompts)
    res = generate(args.model, prompts, args.seeds, out=args.out, negative_prompt=args.negative,
                   guidance_scale=args.cfg, steps=args.steps, scheduler=args.scheduler, width=args.width,
                   height=args.height, lora=args.lora, lora_scale=args.lora_scale, batch_size=args.batch_size,
                   device=args.device, dtype=dtype_of(args), allow_pickle=args.allow_pickle)
    print(f"{res['generated']} generated, {res['skipped']} already there; {res['jsonl']}")
    return 0
