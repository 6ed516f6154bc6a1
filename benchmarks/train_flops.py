"""FLOPs of one SD 1.5 training step, part by part, counted on the full-size architecture without
weights (meta tensors: no memory, no GPU, seconds on a laptop).

    python benchmarks/train_flops.py [--resolution 256 512] [--batch 1]

Why: caching latents and text-encoder outputs removes the VAE encoder and the text encoder from every
step, so the largest speed-up caching can give is (VAE + text + UNet step) / UNet step in FLOPs. The
timing benchmark (train_throughput.py) measures the real ratio on a given machine; this one says
what the ratio can be at full size on any machine where the parts run at similar FLOP/s.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("train_flops")


def sd15_meta():
    """(unet, vae, text_encoder) of the SD 1.5 configs shipped with harness, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models.single_file import sd15_configs

    c = sd15_configs()
    with torch.device("meta"):
        te_cfg = {k: v for k, v in c["text_encoder"].items() if k not in ("architectures", "_name_or_path")}
        return (UNet2DConditionModel.from_config(c["unet"]), AutoencoderKL.from_config(c["vae"]),
                CLIPTextModel(CLIPTextConfig(**te_cfg)))


def gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def vae_encode_gflops(vae, batch: int, resolution: int) -> float:
    x = torch.randn(batch, 3, resolution, resolution, device="meta")
    with torch.no_grad():
        return gflops(lambda: vae.encode(x).latent_dist.sample())


def text_encode_gflops(te, batch: int) -> float:
    ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    with torch.no_grad():
        return gflops(lambda: te(ids)[0])


def unet_step_gflops(unet, batch: int, resolution: int, *, lora: bool, checkpointing: bool) -> float:
    """Forward and backward of one training step (the optimizer update is memory-bound, not counted)."""
    from peft import LoraConfig

    if lora and not getattr(unet, "peft_config", None):
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    elif not lora:
        unet.requires_grad_(True)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    lat = torch.randn(batch, 4, resolution // 8, resolution // 8, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, device="meta")

    def step():
        unet(lat, t, hidden, return_dict=False)[0].float().pow(2).mean().backward()

    return gflops(step)


def table(resolutions: list[int], batch: int) -> list[dict]:
    rows = []
    for res in resolutions:
        for lora in (False, True):
            unet, vae, te = sd15_meta()  # fresh: LoRA adapters are added in place
            enc, txt = vae_encode_gflops(vae, batch, res), text_encode_gflops(te, batch)
            for ckpt in (False, True):
                step = unet_step_gflops(unet, batch, res, lora=lora, checkpointing=ckpt)
                rows.append({"resolution": res, "mode": "lora" if lora else "full", "grad_ckpt": ckpt,
                             "vae_encode": enc / batch, "text_encode": txt / batch, "unet_step": step / batch,
                             "cache_ceiling": (enc + txt + step) / step})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    rows = table(args.resolution, args.batch)
    print("GFLOPs per image of one training step, SD 1.5 architecture (meta tensors)")
    print(f"{'px':>5s} {'mode':5s} {'grad ckpt':>9s} {'VAE enc':>9s} {'text enc':>9s} {'UNet f+b':>9s} "
          f"{'max cached/uncached':>20s}")
    for r in rows:
        print(f"{r['resolution']:5d} {r['mode']:5s} {str(r['grad_ckpt']):>9s} {r['vae_encode']:9.1f} "
              f"{r['text_encode']:9.1f} {r['unet_step']:9.1f} {r['cache_ceiling']:19.2f}x")


if __name__ == "__main__":
    main()
