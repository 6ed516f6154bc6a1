"""``harness info MODEL``: what a checkpoint is, as every other command will load it."""

from __future__ import annotations

import json

KIND_NAMES = {"hub": "Hugging Face hub id", "diffusers": "diffusers folder", "single_file": "single-file checkpoint",
              "pickle": "pickled checkpoint"}


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="hub id (OWNER/NAME), diffusers folder, .safetensors file, "
                   "LoRA weights (diffusers/kohya file or peft folder), or BASE::LORA@SCALE")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickled .ckpt/.pt (can run code; loaded with weights_only=True)")


def run(args) -> int:
    from harness.models.lora_format import is_lora
    from harness.models.lora_info import describe_lora
    from harness.models.lora_spec import is_spec

    if not is_spec(args.model) and is_lora(args.model):
        info = describe_lora(args.model)
        print(json.dumps(info, indent=2) if args.json else format_lora_info(info))
        return 0
    from harness.models.load import describe

    info = describe(args.model, allow_pickle=args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.1f} MB"


def format_info(info: dict) -> str:
    """The readable summary ``harness info`` prints."""
    c = info["components"]
    lines = [f"{info['source']}: {KIND_NAMES.get(info['kind'], info['kind'])} ({info['ref']})",
             f"  {'pipeline':<13} {info['pipeline']}, native {info['resolution']}x{info['resolution']} px, "
             f"{info['latent_channels']} latent channels, cross-attention dim {info['cross_attention_dim']}"]
    for name in ("unet", "vae", "text_encoder"):
        extra = f"  (latent scaling factor {info['vae_scaling_factor']})" if name == "vae" else ""
        lines.append(f"  {name:<13} {c[name]['class']:<22} {c[name]['params']:>13,} params  {c[name]['dtype']}{extra}")
    lines.append(f"  {'tokenizer':<13} {c['tokenizer']['class']} ({c['tokenizer']['vocab_size']:,} tokens)")
    lines.append(f"  {'scheduler':<13} {info['scheduler']}, prediction type {info['prediction_type']}")
    stored = ", ".join(f"{k} x{v}" for k, v in sorted(info["stored_dtypes"].items())) or "n/a"
    lines.append(f"  {'total':<13} {info['params_total']:,} params; stored tensors {stored}; "
                 f"{_mb(info['bytes_on_disk'])} on disk")
    if "lora" in info:
        lines.append(f"  {'lora':<13} fused at scale {info['lora_scale']:g}:")
        lines += ["    " + line for line in format_lora_info(info["lora"]).splitlines()]
    return "\n".join(lines)


LORA_FORMATS = {"diffusers": "diffusers LoRA (pipe.load_lora_weights)", "kohya": "kohya LoRA (A1111, ComfyUI)",
                "peft": "peft adapter folder"}


def format_lora_info(info: dict) -> str:
    """The readable summary of a LoRA file or folder."""
    lines = [f"{info['source']}: {LORA_FORMATS.get(info['format'], info['format'])}"]
    for name, c in info["components"].items():
        alpha = f"alpha {c['alpha']:g}" if isinstance(c["alpha"], (int, float)) else f"alphas {c['alpha']}"
        if not c["alpha_recorded"]:
            alpha += " (not recorded: loaders assume alpha = rank)"
        scale = f", scale alpha/rank {c['scale']:g}" if c["scale"] is not None else ""
        lines.append(f"  {name:<13} {c['layers']} layers, rank {c['rank']}, {alpha}{scale}")
        lines.append(f"  {'':<13} targets {', '.join(c['targets'])}")
    lines.append(f"  {'text encoder':<13} {'yes' if info['text_encoder'] else 'no'}")
    trained = [f"{k.replace('_', ' ')} {info[k]}" for k in ("base_model", "base_sha256", "steps", "resolution",
                                                            "recipe_sha256") if info.get(k)]
    lines.append(f"  {'trained':<13} {'; '.join(trained) if trained else 'on an unrecorded base model'}")
    stored = ", ".join(f"{k} x{v}" for k, v in sorted(info["stored_dtypes"].items())) or "n/a"
    lines.append(f"  {'total':<13} {info['tensors']} tensors ({stored}); {_mb(info['bytes_on_disk'])} on disk")
    return "\n".join(lines)
