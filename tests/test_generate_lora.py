"""The grid's ``lora_scale`` axis with a real (tiny, random) LoRA on the tiny zoo UNet: scale 0 is the
base model's image, scale 1 is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.generate.grid import GridSpec, run_grid
from harness.generate.pipes import PipelineCache
from harness.generate.sample import Sample, denoise, to_pil


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    torch.manual_seed(0)
    # init_lora_weights=False draws B at random too, so the adapter changes the output from the start.
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    return out / "pytorch_lora_weights.safetensors"


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_lora_scale_axis_zero_is_the_base_image_and_one_differs(tiny_sd_dir, tiny_lora, tmp_path):
    assert tiny_lora.is_file()
    cache = PipelineCache(device="cpu", dtype=torch.float32)
    spec = GridSpec(checkpoint=str(tiny_sd_dir), prompt="a red cat", lora=str(tiny_lora), x="lora_scale=0,1",
                    seeds=(5,), steps=2, cfg=5.0, width=64, height=64)
    data = run_grid(spec, tmp_path, progress=False, cache=cache)
    assert data["counts"]["generated"] == 2 and data["counts"]["loads"] == 2  # the scale is fused per load
    cells = {c["x"]: c for c in data["cells"]}
    assert [cells[i]["params"]["lora_scale"] for i in (0, 1)] == [0.0, 1.0]
    assert data["axes"]["x"]["name"] == "lora_scale" and "lora_scale" not in data["fixed"]
    scale0 = _pixels(tmp_path / cells[0]["images"][0]["file"])
    scale1 = _pixels(tmp_path / cells[1]["images"][0]["file"])

    base = cache.get(str(tiny_sd_dir))  # no LoRA at all
    single = denoise(base, [Sample("a red cat", seed=5, guidance_scale=5.0, steps=2)], width=64, height=64)
    no_lora = np.asarray(to_pil(single.images)[0], dtype=np.int16)
    assert np.array_equal(scale0, no_lora)  # fused at 0 leaves the weights exactly as they were
    assert np.abs(scale1 - no_lora).mean() > 5  # the random adapter changes the image
