"""``harness export MODEL --out PATH``: a diffusers folder or one A1111/ComfyUI-loadable .safetensors."""

from __future__ import annotations


def add_arguments(p) -> None:
    from harness.models.export import FORMATS
    from harness.models.load import DTYPES

    p.add_argument("model", metavar="MODEL", help="hub id, diffusers folder, or single-file checkpoint")
    p.add_argument("--out", required=True, metavar="PATH", help="output folder, or a file ending in .safetensors")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="diffusers folder or single .safetensors in the original LDM layout "
                        "(default: from --out's suffix)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast weights (default: keep)")
    p.add_argument("--lora", metavar="PATH", default=None, help="LoRA weights to fuse in before exporting")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength when fusing (default 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickled .ckpt/.pt input (can run code; loaded with weights_only=True)")


def run(args) -> int:
    from harness.models.export import export

    out = export(args.model, args.out, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                 allow_pickle=args.allow_pickle, lora=args.lora, lora_scale=args.lora_scale)
    print(out)
    return 0
