"""LoRA files as the trainer writes them (issue 19): alpha != rank fuses at alpha / rank through diffusers
and the harness loader, in the diffusers file and the kohya one; every kohya layer patches exactly the
single-file (LDM) weight the export writes; ``harness info`` on each format; the BASE::LORA@SCALE syntax."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from harness.cli import main
from harness.errors import CheckpointError, ConfigError
from harness.models import lora_format as lf
from harness.models.load import load_pipeline
from harness.models.lora_info import describe_lora
from harness.models.lora_spec import ModelSpec, parse_spec

RANK, ALPHA = 4, 16.0  # scale 4: a loader that assumes alpha = rank fuses a quarter of the update
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut"]  # attention, feed-forward and resnet layers, convs too
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _trained(tiny_sd_dir):
    """The tiny zoo's pipeline with the trainer's adapters, their up-projections moved off zero."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                     target_modules=UNET_TARGETS))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                       target_modules=TE_TARGETS), pipe.text_encoder)
    with torch.no_grad():
        for m in (pipe.unet, pipe.text_encoder):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return pipe


def _effective(model) -> dict[str, torch.Tensor]:
    """What the trained model computes with: each adapted layer's base weight plus peft's own delta."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer"):
            assert mod.scaling["default"] == ALPHA / RANK
            out[f"{name}.weight"] = (mod.base_layer.weight + mod.get_delta_weight("default")).detach().clone()
    return out


@pytest.fixture(scope="module")
def exported(tiny_sd_dir, tmp_path_factory):
    from harness.train.pipeline import save_lora

    pipe = _trained(tiny_sd_dir)
    out = tmp_path_factory.mktemp("lora") / "lora"
    save_lora(pipe.unet, pipe.text_encoder, out, kohya_file="style.safetensors",
              metadata={"harness.base_model": str(tiny_sd_dir)}, kohya_metadata={"ss_network_dim": str(RANK)})
    return {"dir": out, "kohya": out / "style.safetensors", "unet": _effective(pipe.unet),
            "te": _effective(pipe.text_encoder)}


def _max_diff(pipe, exported) -> float:
    u, t = pipe.unet.state_dict(), pipe.text_encoder.state_dict()
    return max([(u[k] - v).abs().max().item() for k, v in exported["unet"].items()]
               + [(t[k] - v).abs().max().item() for k, v in exported["te"].items()])


def test_both_files_fuse_at_alpha_over_rank_in_diffusers_and_the_harness_loader(tiny_sd_dir, exported):
    from diffusers import StableDiffusionPipeline

    assert sorted(p.name for p in exported["dir"].iterdir()) == [lf.DIFFUSERS_FILE, "style.safetensors"]
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    base_w = {k: v.clone() for k, v in base.unet.state_dict().items()}
    diffs = {}
    for name, weight in (("diffusers", None), ("kohya", "style.safetensors")):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        pipe.load_lora_weights(str(exported["dir"]), **({"weight_name": weight} if weight else {}))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        diffs[f"{name} via diffusers"] = _max_diff(pipe, exported)
    diffs["diffusers via harness"] = _max_diff(load_pipeline(tiny_sd_dir, lora=exported["dir"]), exported)
    diffs["kohya via harness"] = _max_diff(load_pipeline(f"{tiny_sd_dir}::{exported['kohya']}@1"), exported)
    assert all(d < 1e-6 for d in diffs.values()), diffs
    # the update is not small next to the tolerance: a loader assuming alpha = rank would miss by 3/4 of it
    k = next(iter(exported["unet"]))
    assert (exported["unet"][k] - base_w[k]).abs().max() > 1e-2
    half = load_pipeline(f"{tiny_sd_dir}::{exported['kohya']}@0.5").unet.state_dict()[k]
    torch.testing.assert_close(half, base_w[k] + 0.5 * (exported["unet"][k] - base_w[k]), atol=1e-6, rtol=0)


def test_every_kohya_layer_patches_the_single_file_weight_the_export_writes(tiny_sd_dir, exported, tmp_path):
    """Transcription-free: export the base and the LoRA-fused model as single files (LDM names) and diff
    them. The weights that changed must be exactly the ones the kohya names map to, each by
    up @ down * alpha / rank: what A1111 and ComfyUI add to the LDM weight of that name."""
    from harness.models.export import export_single_file

    before = load_file(str(export_single_file(load_pipeline(tiny_sd_dir), tmp_path / "base.safetensors")))
    fused = load_pipeline(tiny_sd_dir, lora=exported["kohya"])  # diffusers reads the kohya names its own way
    after = load_file(str(export_single_file(fused, tmp_path / "fused.safetensors")))
    kohya = load_file(str(exported["kohya"]))
    targets = lf.kohya_ldm_targets(load_pipeline(tiny_sd_dir))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    mapped = {}
    for key, down in kohya.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            ldm, shape = targets[name]
            assert ldm.startswith(("model.diffusion_model.", "cond_stage_model.transformer.")) and ldm in before
            assert tuple(before[ldm].shape) == shape
            up, alpha = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"].item()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * alpha / down.shape[0]
            mapped[ldm] = delta
    assert len(mapped) == len(kohya) // 3 > 40
    assert changed == set(mapped)
    worst = max((after[k] - before[k] - d).abs().max().item() for k, d in mapped.items())
    assert worst < 1e-5, worst
    assert lf.check_kohya(kohya, fused, "test") == len(mapped)


def test_kohya_names_map_at_full_sd15_size():
    """The tiny zoo has one layer per block; SD 1.5 has two (the numbering A1111 hard-codes). On the meta
    device: the 128 attention layers and 48 text-encoder layers of a standard SD 1.5 LoRA all land on
    weights of the single-file layout with their shapes."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models import single_file as sf

    cfg = sf.sd15_configs()
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with init_empty_weights():
        pipe = SimpleNamespace(unet=UNet2DConditionModel.from_config(strip(cfg["unet"])),
                               vae=AutoencoderKL.from_config(strip(cfg["vae"])),
                               text_encoder=CLIPTextModel(CLIPTextConfig(**strip(cfg["text_encoder"]))))
    ldm = {k: tuple(v.shape) for k, v in sf.diffusers_to_ldm(pipe).items()}
    targets = lf.kohya_ldm_targets(pipe)
    attn = {n: t for n, t in targets.items() if n.startswith("lora_unet_") and n.endswith(("_to_q", "_to_k", "_to_v",
                                                                                           "_to_out_0"))}
    te = {n: t for n, t in targets.items() if n.startswith("lora_te_") and n.endswith(("q_proj", "k_proj", "v_proj",
                                                                                       "out_proj"))}
    assert len(attn) == 128 and len(te) == 48
    assert all(ldm.get(key) == shape for key, shape in targets.values())
    # the name A1111's own converter gives the first attention of the first down block
    assert targets["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"][0] == \
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


def test_check_kohya_names_a_layer_that_fits_nowhere(tiny_sd_dir, exported):
    kohya = load_file(str(exported["kohya"]))
    pipe = load_pipeline(tiny_sd_dir)
    bad = dict(kohya, **{"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8),
                         "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(CheckpointError, match="lora_unet_nowhere matches no weight"):
        lf.check_kohya(bad, pipe, "x.safetensors")
    name = next(k for k in kohya if k.endswith("to_q.lora_down.weight"))
    wrong = dict(kohya, **{name: torch.zeros(RANK, 3)})
    with pytest.raises(CheckpointError, match="the weight it patches"):
        lf.check_kohya(wrong, pipe, "x.safetensors")


@pytest.fixture(scope="module")
def peft_dir(tiny_sd_dir, tmp_path_factory):
    """A peft folder (PeftModel.save_pretrained) with a per-layer alpha: diffusers alone would fuse it at 1."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    torch.manual_seed(1)
    model = get_peft_model(pipe.unet, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_v"],
                                                 alpha_pattern={"attn2.to_q": 2.0}, init_lora_weights=False))
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(out))
    return out, _effective_any(model.base_model.model)


def _effective_any(model) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": (m.base_layer.weight + m.get_delta_weight("default")).detach().clone()
            for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}


def test_a_peft_folder_fuses_at_its_own_per_layer_scales(tiny_sd_dir, peft_dir):
    folder, effective = peft_dir
    fused = load_pipeline(f"{tiny_sd_dir}::{folder}").unet.state_dict()
    assert max((fused[k] - v).abs().max().item() for k, v in effective.items()) < 1e-6


@pytest.mark.parametrize("which", ["dir", "diffusers", "kohya", "peft"])
def test_info_describes_each_lora_format(which, exported, peft_dir, capsys):
    path = {"dir": exported["dir"], "diffusers": exported["dir"] / lf.DIFFUSERS_FILE, "kohya": exported["kohya"],
            "peft": peft_dir[0]}[which]
    info = describe_lora(path)
    assert info["format"] == {"dir": "diffusers"}.get(which, which)
    unet = info["components"]["unet"]
    assert unet["rank"] == RANK and unet["alpha_recorded"]
    if which == "peft":
        assert unet["alpha"] == [2.0, ALPHA] and unet["targets"] == ["to_q", "to_v"] and not info["text_encoder"]
        assert info["base_model"] is None
    else:
        assert unet["alpha"] == ALPHA and unet["scale"] == ALPHA / RANK and info["text_encoder"]
        assert {"to_q", "conv1"} <= set(unet["targets"]) and info["base_model"]
        assert info["components"]["text_encoder"]["targets"] == sorted(TE_TARGETS)
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"rank {RANK}" in text and "targets" in text and ("text encoder  yes" in text) == (which != "peft")


def test_info_on_base_with_lora_and_on_a_file_that_is_no_lora(tiny_sd_dir, exported, tmp_path, capsys):
    assert main(["info", f"{tiny_sd_dir}::{exported['kohya']}@0.5"]) == 0
    text = capsys.readouterr().out
    assert "fused at scale 0.5" in text and "kohya LoRA" in text
    from safetensors.torch import save_file

    save_file({"weird.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        load_pipeline(f"{tiny_sd_dir}::{tmp_path / 'w.safetensors'}")


@pytest.mark.parametrize("text,spec", [
    ("zoo/sd", ModelSpec("zoo/sd")),
    ("zoo/sd::runs/a/lora", ModelSpec("zoo/sd", "runs/a/lora", 1.0)),
    ("hf:o/n::runs/a@b/lora@0.75", ModelSpec("hf:o/n", "runs/a@b/lora", 0.75)),
    ("zoo/sd::x.safetensors@-1", ModelSpec("zoo/sd", "x.safetensors", -1.0)),
])
def test_spec_syntax(text, spec):
    assert parse_spec(text) == spec


@pytest.mark.parametrize("text,match", [
    ("zoo/sd::lora@strong", "scale 'strong' is not a number"),
    ("zoo/sd::lora@inf", "not finite"),
    ("::lora@1", "one '::' between"),
    ("zoo/sd::a::b", "one '::' between"),
])
def test_bad_spec_is_one_line_naming_the_part(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_spec(text)
