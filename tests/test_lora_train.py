"""What a training run exports (issue 19), end to end on the tiny zoo: a LoRA trained with alpha != rank
(text encoder too) is fused into final/ at alpha / rank, and its diffusers and kohya files both load at
that strength with the run's ss_* metadata; a full fine-tune's single file is fp16 unless asked otherwise."""

from __future__ import annotations

import json

import pytest
from _train_helpers import REPO, make_dataset
from _train_helpers import quick_recipe as recipe
from safetensors.torch import load_file

from harness.models import lora_format as lf
from harness.models.load import load_pipeline
from harness.models.safety import read_safetensors_header
from harness.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
RANK, ALPHA = 4, 16


@pytest.fixture(scope="module")
def lora_run(tiny_sd_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-run")
    data = make_dataset(tmp / "data", n_train=4, n_val=0, size=32)
    final = train(recipe(tiny_sd_dir, data, tmp, **{
        "lora.enabled": True, "lora.rank": RANK, "lora.alpha": ALPHA, "lora.text_encoder": True,
        "data.cache_text": False, "train.lr": 0.05, "train.max_steps": 3}))
    return final


def _expected(base_state: dict, lora_state: dict, prefix: str) -> dict:
    """base + alpha / rank * B @ A for every layer of the diffusers file (the trained matrices)."""
    out = {}
    for module, (down, up) in lf.layers(lora_state, prefix).items():
        out[f"{module}.weight"] = base_state[f"{module}.weight"] + (ALPHA / RANK) * up @ down
    return out


def test_final_and_both_lora_files_fuse_at_alpha_over_rank(lora_run, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    run = lora_run.parent
    lora_dir = run / "lora"
    assert sorted(p.name for p in lora_dir.iterdir()) == [lf.DIFFUSERS_FILE, f"{run.name}.safetensors"]
    trained = load_file(str(lora_dir / lf.DIFFUSERS_FILE))
    base = load_pipeline(tiny_sd_dir)
    want = {"unet": _expected(base.unet.state_dict(), trained, "unet."),
            "text_encoder": _expected(base.text_encoder.state_dict(), trained, "text_encoder.")}
    assert len(want["unet"]) == 32 and len(want["text_encoder"]) == 8

    def worst(pipe) -> float:
        return max((getattr(pipe, c).state_dict()[k] - v).abs().max().item() for c, w in want.items()
                   for k, v in w.items())

    final = StableDiffusionPipeline.from_pretrained(lora_run)
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    plain.load_lora_weights(str(lora_dir), weight_name=f"{run.name}.safetensors")
    plain.fuse_lora()
    plain.unload_lora_weights()
    diffs = {"final/": worst(final), "kohya via diffusers": worst(plain),
             "kohya via harness": worst(load_pipeline(f"{tiny_sd_dir}::{lora_dir / (run.name + '.safetensors')}")),
             "diffusers via harness": worst(load_pipeline(tiny_sd_dir, lora=lora_dir))}
    assert all(d < 1e-5 for d in diffs.values()), diffs
    # the update is well above that tolerance: at scale 1 (alpha taken as rank) final/ would be far off
    delta = max((want["unet"][k] - base.unet.state_dict()[k]).abs().max().item() for k in want["unet"])
    assert delta * (1 - RANK / ALPHA) > 1e-3, delta


def test_kohya_file_carries_ss_metadata_and_patches_the_single_file_layout(lora_run, tiny_sd_dir):
    from harness.provenance import tree_sha256

    run = lora_run.parent
    kohya = run / "lora" / f"{run.name}.safetensors"
    meta = read_safetensors_header(kohya).metadata
    summary = json.loads((run / "train_summary.json").read_text())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(RANK)
    assert meta["ss_network_alpha"] == str(ALPHA) and meta["ss_resolution"] == "(32, 32)"
    assert meta["ss_steps"] == "3" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == tiny_sd_dir.name and meta["ss_network_train_unet_only"] == "False"
    assert meta["harness.recipe_sha256"] == summary["recipe_sha256"]
    assert meta["harness.base_sha256"] == tree_sha256(tiny_sd_dir)
    diffusers_meta = read_safetensors_header(run / "lora" / lf.DIFFUSERS_FILE).metadata
    assert json.loads(diffusers_meta[lf.ADAPTER_METADATA])["unet.lora_alpha"] == ALPHA
    assert diffusers_meta["harness.base_model"] == str(tiny_sd_dir)
    ldm = read_safetensors_header(lora_run.with_suffix(".safetensors")).tensors  # the merged model's single file
    targets = lf.kohya_ldm_targets(load_pipeline(tiny_sd_dir))
    for key, (_, shape) in read_safetensors_header(kohya).tensors.items():
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            assert ldm[targets[name][0]][1][0] == shape[0]


def test_full_finetune_single_file_is_fp16_and_final_keeps_fp32(tiny_sd_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    final = train(recipe(tiny_sd_dir, data, tmp_path, **{"train.max_steps": 1, "train.lr": 1e-3}))
    single = read_safetensors_header(final.with_suffix(".safetensors"))
    floats = {dt for dt, _ in single.tensors.values() if dt.startswith(("F", "BF"))}
    assert floats == {"F16"}
    assert set(read_safetensors_header(final / "unet" / "diffusion_pytorch_model.safetensors").dtypes()) == {"F32"}
    full = load_pipeline(final).unet.state_dict()
    half = load_pipeline(final.with_suffix(".safetensors")).unet.state_dict()
    worst = max((full[k] - half[k]).abs().max().item() for k in full)
    assert 0 < worst < 5e-3  # rounded to fp16, nothing else


def test_single_file_dtype_fp32_and_bf16_on_request_and_bad_value_named(tiny_sd_dir, tmp_path):
    from harness.train.pipeline import export_pipeline
    from harness.train.recipe import load_recipe

    pipe = load_pipeline(tiny_sd_dir)
    for dt, name in (("fp32", "F32"), ("bf16", "BF16")):
        out = export_pipeline(pipe, tmp_path / dt / "final", single_file_dtype=dt)
        floats = {d for d, _ in read_safetensors_header(out.with_suffix(".safetensors")).tensors.values()
                  if d.startswith(("F", "BF"))}
        assert floats == {name}
    with pytest.raises(Exception, match=r"checkpoint\.single_file_dtype.*fp64"):
        load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ["model.source=x", "data.root=y", "output_dir=z",
                                                         "checkpoint.single_file_dtype=fp64"])


def test_info_on_a_trained_lora_prints_its_facts(lora_run, capsys):
    from harness.cli import main

    run = lora_run.parent
    for path in (run / "lora", run / "lora" / f"{run.name}.safetensors"):
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"rank {RANK}, alpha {ALPHA}" in out and "scale alpha/rank 4" in out and "steps 3" in out
        assert "text encoder  yes" in out and "recipe sha256" in out
