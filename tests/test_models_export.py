"""Export round trips (diffusers folder and LDM single file), the LDM key layout, and interop with
diffusers' own ``from_single_file``."""

from __future__ import annotations

import json
import types

import pytest
import torch

from harness.errors import HarnessError
from harness.models import single_file as sf
from harness.models.export import export, export_diffusers, export_single_file
from harness.models.load import load_pipeline
from harness.models.safety import read_safetensors_header


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def _assert_same(a, b, cast=None) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sa) == set(sb), name
        for k, v in sa.items():
            want = v.to(cast) if cast is not None and v.is_floating_point() else v
            assert sb[k].dtype == want.dtype, f"{name}.{k}"
            assert torch.equal(want, sb[k]), f"{name}.{k}"


def test_tiny_diffusers_round_trip(tiny_pipe, tmp_path):
    out = export_diffusers(tiny_pipe, tmp_path / "sd")
    _assert_same(tiny_pipe, load_pipeline(out))
    half = export_diffusers(tiny_pipe, tmp_path / "sd16", dtype="fp16")
    assert set(read_safetensors_header(half / "unet" / "diffusion_pytorch_model.safetensors").dtypes()) == {"F16"}
    _assert_same(tiny_pipe, load_pipeline(half, dtype="fp16"), cast=torch.float16)
    assert tiny_pipe.unet.dtype == torch.float32  # the live pipeline is left as it was


def test_tiny_single_file_round_trip(tiny_pipe, tmp_path):
    out = export_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    header = read_safetensors_header(out)
    configs = json.loads(header.metadata[sf.CONFIG_KEY])
    assert configs["unet"]["block_out_channels"] == [32, 64] and configs["scheduler"]["_class_name"] == "PNDMScheduler"
    back = load_pipeline(out)
    _assert_same(tiny_pipe, back)
    assert back.scheduler.config.steps_offset == 1 and back.vae.config.scaling_factor == 0.18215
    for dtype, torch_dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        f = export_single_file(tiny_pipe, tmp_path / f"tiny-{dtype}.safetensors", dtype=dtype)
        _assert_same(tiny_pipe, load_pipeline(f, dtype=None), cast=torch_dtype)


def test_tiny_single_file_uses_original_names(tiny_pipe):
    ldm = sf.diffusers_to_ldm(tiny_pipe)
    assert all(k.startswith(tuple(sf.PREFIX.values())) for k in ldm)
    diffusers_only = ("down_blocks", "up_blocks", "resnets", "conv_shortcut", "group_norm", "to_out.0", "mid_block")
    vae_keys = [k for k in ldm if k.startswith("first_stage_model.")]
    assert not [k for k in vae_keys if any(s in k for s in diffusers_only)]
    unet_keys = [k for k in ldm if k.startswith("model.diffusion_model.")]
    assert not [k for k in unet_keys if any(s in k for s in ("down_blocks", "up_blocks", "resnets", "mid_block"))]
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    assert "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight" in ldm  # 16 -> 32 channels
    assert ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in ldm  # upsampler after a block without attention


def _meta_pipe(configs):
    """SD-shaped modules with meta tensors: key names and shapes without allocating 4 GB."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with init_empty_weights(include_buffers=True):
        return types.SimpleNamespace(unet=UNet2DConditionModel.from_config(strip(configs["unet"])),
                                     vae=AutoencoderKL.from_config(strip(configs["vae"])),
                                     text_encoder=CLIPTextModel(CLIPTextConfig(**strip(configs["text_encoder"]))))


def test_sd15_layout_matches_the_original_checkpoint_keys():
    pipe = _meta_pipe(sf.sd15_configs())
    ldm = sf.diffusers_to_ldm(pipe)
    # v1-5-pruned(-emaonly) holds 1131 tensors: 686 UNet, 248 VAE, 197 CLIP (with position_ids).
    counts = {p: sum(k.startswith(p) for k in ldm) for p in sf.PREFIX.values()}
    assert counts == {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.transformer.": 197}
    assert sum(v.numel() for k, v in ldm.items() if not k.endswith("position_ids")) == 1_066_235_307
    known = {  # names and shapes of the original SD 1.x checkpoint
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    assert {k: tuple(ldm[k].shape) for k in known} == known
    # diffusers' own converter maps every one of our names back onto the model's parameters.
    parts = sf.ldm_to_diffusers(ldm, sf.sd15_configs())
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(pipe, name).state_dict()
        assert set(parts[name]) == set(expected), name
        assert all(parts[name][k].shape == expected[k].shape for k in expected)


def test_diffusers_from_single_file_reads_our_export(tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    f = export_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    config = sf.write_config_folder(tmp_path / "config", sf.pipeline_configs(tiny_pipe))
    theirs = StableDiffusionPipeline.from_single_file(str(f), config=str(config), local_files_only=True,
                                                      safety_checker=None)
    _assert_same(tiny_pipe, theirs)


def test_export_refuses_to_overwrite(tiny_pipe, tmp_path):
    f = export_single_file(tiny_pipe, tmp_path / "a.safetensors")
    before = f.read_bytes()
    with pytest.raises(HarnessError, match=r"a\.safetensors: already exists; refusing to overwrite"):
        export_single_file(tiny_pipe, f)
    d = export_diffusers(tiny_pipe, tmp_path / "d")
    with pytest.raises(HarnessError, match="already exists"):
        export_diffusers(tiny_pipe, d)
    assert f.read_bytes() == before
    export_single_file(tiny_pipe, f, dtype="fp16", overwrite=True)
    assert f.stat().st_size < len(before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_export_from_a_source_and_bad_arguments(tiny_sd_dir, tiny_pipe, tmp_path):
    out = export(tiny_sd_dir, tmp_path / "x.safetensors")
    _assert_same(tiny_pipe, load_pipeline(out))
    assert (export(out, tmp_path / "folder") / "model_index.json").is_file()
    with pytest.raises(HarnessError, match="format 'ckpt' is unknown; expected one of diffusers, safetensors"):
        export(tiny_pipe, tmp_path / "y", format="ckpt")
    with pytest.raises(HarnessError, match=r"must end in \.safetensors"):
        export(tiny_pipe, tmp_path / "y.bin", format="safetensors")
    with pytest.raises(HarnessError, match="dtype 'fp8' is not supported"):
        export(tiny_pipe, tmp_path / "z.safetensors", dtype="fp8")


@pytest.mark.slow
def test_full_size_sd15_single_file_round_trip(tmp_path):
    """1.07B random weights in fp16: our export, our loader (packaged configs, no metadata) and
    diffusers' from_single_file all agree bit for bit."""
    from diffusers import StableDiffusionPipeline

    from harness.models.tiny import build_random_sd15

    pipe = build_random_sd15(seed=0, dtype=torch.float16)
    f = export_single_file(pipe, tmp_path / "sd15.safetensors", embed_configs=False)
    header = read_safetensors_header(f)
    assert sf.CONFIG_KEY not in header.metadata and len(header.tensors) == 1131
    back = load_pipeline(f, dtype=None)
    _assert_same(pipe, back)
    del back
    theirs = StableDiffusionPipeline.from_single_file(
        str(f), config=str(sf.write_config_folder(tmp_path / "config")), local_files_only=True,
        safety_checker=None, dtype=torch.float16)
    _assert_same(pipe, theirs)


def test_unfused_lora_adapters_are_refused(tiny_sd_dir, tmp_path):
    from peft import LoraConfig

    from harness.errors import CheckpointError

    pipe = load_pipeline(tiny_sd_dir)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(CheckpointError, match="unfused LoRA adapters.*fuse_lora"):
        export_single_file(pipe, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
