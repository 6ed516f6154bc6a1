"""Loading checkpoints: source resolution, offline hub, single files, pickle refusal, header checks,
dtype/scheduler/device/LoRA options, describe, and the latent preview."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from harness.errors import CheckpointError, HarnessError, UnsafeCheckpointError
from harness.models import safety
from harness.models.load import describe, load_pipeline, resolve_source
from harness.models.preview import SD15_LATENT_RGB_FACTORS, latent_to_rgb
from harness.models.schedulers import SCHEDULERS


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


@pytest.fixture(scope="module")
def tiny_ldm_file(tiny_pipe, tmp_path_factory):
    from harness.models.export import export_single_file

    return export_single_file(tiny_pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sa) == set(sb), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


# ------------------------------------------------------------------ telling sources apart

def test_hub_id_is_not_a_local_path_and_back(tmp_path, monkeypatch, tiny_sd_dir):
    monkeypatch.chdir(tmp_path)
    assert resolve_source("runwayml/stable-diffusion-v1-5").kind == "hub"
    # The same spelling names a local folder once one exists: an existing path always wins ...
    shutil.copytree(tiny_sd_dir, tmp_path / "runwayml" / "stable-diffusion-v1-5")
    assert resolve_source("runwayml/stable-diffusion-v1-5").kind == "diffusers"
    # ... unless the hub is asked for explicitly.
    assert resolve_source("hf:runwayml/stable-diffusion-v1-5").kind == "hub"


@pytest.mark.parametrize("spelling", ["./foo", "../foo/bar", "/no/such/dir", "~/no-such-harness-dir/x",
                                      "models/sd15.safetensors", "sd15.ckpt", "justaname", "a/b/c"])
def test_missing_local_looking_path_is_not_found(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not found") as e:
        resolve_source(spelling)
    assert spelling in str(e.value) and "\n" not in str(e.value)


def test_folder_without_model_index_and_unknown_file_type(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_pipeline(tmp_path / "d")
    (tmp_path / "m.onnx").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"m\.onnx.*unknown checkpoint file type '.onnx'"):
        load_pipeline(tmp_path / "m.onnx")


def test_hub_id_offline_and_not_cached_is_one_line_error(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_pipeline("runwayml/stable-diffusion-v1-5", cache_dir=tmp_path)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "local" in msg and "runwayml/stable-diffusion-v1-5" in msg
    assert "\n" not in msg


def test_hub_id_loads_from_the_offline_cache(tmp_path, tiny_sd_dir, tiny_pipe):
    # The hub cache layout: models--OWNER--NAME/{refs/main, snapshots/<commit>/...}.
    repo, commit = tmp_path / "models--harness-test--tiny-sd", "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / commit)
    _same_weights(load_pipeline("harness-test/tiny-sd", cache_dir=tmp_path), tiny_pipe)


# ------------------------------------------------------------------ single files and bad files

def test_single_file_loads_with_embedded_configs(tiny_ldm_file, tiny_pipe):
    pipe = load_pipeline(tiny_ldm_file)
    _same_weights(pipe, tiny_pipe)
    assert type(pipe.scheduler).__name__ == type(tiny_pipe.scheduler).__name__
    assert pipe.scheduler.config.steps_offset == 1


def test_wrong_keys_are_not_an_sd_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"backbone.conv.weight": torch.zeros(2, 2)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(CheckpointError, match=r"resnet\.safetensors: not a Stable Diffusion checkpoint.*"
                                              r"model\.diffusion_model"):
        load_pipeline(tmp_path / "resnet.safetensors")
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="diffusers-format UNet"):
        load_pipeline(tmp_path / "unet.safetensors")


def test_truncated_single_file(tiny_ldm_file, tmp_path):
    data = tiny_ldm_file.read_bytes()
    for n, why in [(0, "truncated or empty"), (5, "truncated or empty"), (100, "truncated: header claims"),
                   (len(data) // 2, "truncated or corrupt: tensor")]:
        cut = tmp_path / f"cut{n}.safetensors"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=why) as e:
            load_pipeline(cut)
        assert str(cut) in str(e.value) and "\n" not in str(e.value)


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", claimed_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claimed_len is None else claimed_len) + raw + data)
    return path


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail if anything gets as far as reading tensors (i.e. allocating)."""
    import safetensors.torch

    def boom(*a, **k):
        raise AssertionError("tensors were read from a file whose header should have been refused")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)


def test_header_claiming_a_terabyte_is_refused_before_allocation(tmp_path, no_tensor_reads):
    tb = 1 << 40
    big = _raw_safetensors(tmp_path / "big.safetensors", {
        "model.diffusion_model.x": {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, tb]},
        "first_stage_model.x": {"dtype": "F32", "shape": [1], "data_offsets": [tb, tb + 4]},
        "cond_stage_model.transformer.x": {"dtype": "F32", "shape": [1], "data_offsets": [tb + 4, tb + 8]}},
        data=b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"claims bytes up to 1,099,511,627,776 but the file holds 64"):
        load_pipeline(big)
    huge_header = _raw_safetensors(tmp_path / "hdr.safetensors", b"{}", claimed_len=tb)
    with pytest.raises(CheckpointError, match=r"header claims 1,099,511,627,776 bytes \(limit"):
        load_pipeline(huge_header)


@pytest.mark.parametrize("entry, why", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "needs 16 bytes but its offsets span 8"),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, "unknown dtype 'Q4'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]}, "invalid shape"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [8, 0]}, "invalid data_offsets"),
    ("nope", "is not an object"),
])
def test_inconsistent_header_entries_are_refused(tmp_path, entry, why, no_tensor_reads):
    path = _raw_safetensors(tmp_path / "x.safetensors", {"model.diffusion_model.w": entry}, data=b"\x00" * 16)
    with pytest.raises(CheckpointError, match=why):
        safety.read_safetensors_header(path)


def test_header_that_is_not_json(tmp_path):
    path = _raw_safetensors(tmp_path / "x.safetensors", b"{not json", data=b"")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        load_pipeline(path)


# ------------------------------------------------------------------ pickles

class _WritesMarker:
    """Unpickling this object would create ``path``: a stand-in for a malicious payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": _WritesMarker(marker)}
    zip_ckpt = tmp_path / "evil.ckpt"
    torch.save(payload, zip_ckpt)
    raw_pt = tmp_path / "evil.pt"
    raw_pt.write_bytes(pickle.dumps(payload, protocol=2))
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(zip_ckpt.read_bytes())
    return marker, [zip_ckpt, raw_pt, disguised]


def test_pickled_checkpoint_refused_and_never_unpickled(tmp_path):
    marker, files = _malicious_files(tmp_path)
    for f in files:
        with pytest.raises(UnsafeCheckpointError, match="arbitrary code|holds a pickle"):
            load_pipeline(f)
        assert not marker.exists(), f"unpickling {f.name} ran code"


def test_allow_pickle_still_refuses_code_via_weights_only(tmp_path):
    marker, files = _malicious_files(tmp_path)
    for f in files[:2]:
        with pytest.raises(UnsafeCheckpointError, match=r"weights_only=True\) refused it.*Unsupported global"):
            load_pipeline(f, allow_pickle=True)
        assert not marker.exists(), f"unpickling {f.name} ran code"
    with pytest.raises(UnsafeCheckpointError):  # a pickle named .safetensors is never unpickled
        load_pipeline(files[2], allow_pickle=True)
    assert not marker.exists()


def test_plain_ckpt_loads_only_with_allow_pickle(tmp_path, tiny_ldm_file, tiny_pipe):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    # Configs normally come from the file's metadata; a .ckpt has none, so only SD 1.5 sizes load
    # from one. Check the refusal, then that weights_only loading reaches the strict shape check.
    torch.save({"state_dict": load_file(str(tiny_ldm_file)), "global_step": 7}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_pipeline(ckpt)
    with pytest.raises(CheckpointError, match="config expects|lack"):
        load_pipeline(ckpt, allow_pickle=True)
    state = safety.load_pickled(ckpt, allow_pickle=True)
    assert set(state) == set(load_file(str(tiny_ldm_file)))


def test_diffusers_folder_with_only_pickled_weights_is_refused(tmp_path, tiny_sd_dir):
    from safetensors.torch import load_file

    d = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, d)
    st = d / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st)), d / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"diffusion_pytorch_model\.bin: refused"):
        load_pipeline(d)


# ------------------------------------------------------------------ options

def test_dtype_option(tiny_sd_dir, tiny_pipe):
    for name, want in [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]:
        pipe = load_pipeline(tiny_sd_dir, dtype=name)
        assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {want}
    k = "conv_in.weight"
    half = load_pipeline(tiny_sd_dir, dtype="fp16").unet.state_dict()[k]
    assert torch.equal(half, tiny_pipe.unet.state_dict()[k].half())
    with pytest.raises(HarnessError, match="dtype 'int8' is not supported; expected one of fp32, fp16, bf16"):
        load_pipeline(tiny_sd_dir, dtype="int8")


def test_scheduler_option(tiny_sd_dir):
    from harness.models.load import set_scheduler

    pipe = load_pipeline(tiny_sd_dir, scheduler="euler_a")
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    for name in SCHEDULERS:
        set_scheduler(pipe, name)
    set_scheduler(pipe, "DDIMScheduler")
    assert pipe.scheduler.config.clip_sample is False
    with pytest.raises(HarnessError, match=r"scheduler 'karras_magic' is not known.*; known schedulers: ddim, euler"):
        set_scheduler(pipe, "karras_magic")
    with pytest.raises(HarnessError, match="not known"):
        set_scheduler(pipe, "StableDiffusionPipeline")  # a diffusers class, but not a scheduler


def test_device_option(tiny_sd_dir):
    assert load_pipeline(tiny_sd_dir, device="cpu").unet.device.type == "cpu"
    with pytest.raises(HarnessError, match="device 'gpu0' is not valid"):
        load_pipeline(tiny_sd_dir, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(HarnessError, match="CUDA is not available"):
            load_pipeline(tiny_sd_dir, device="cuda")


def test_lora_is_fused_into_exactly_the_targeted_weights(tmp_path, tiny_sd_dir, tiny_pipe):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline(tiny_sd_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
    # The adapter metadata carries lora_alpha; without it diffusers assumes alpha == r.
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    lora_sd = get_peft_model_state_dict(pipe.unet)
    fused = load_pipeline(tiny_sd_dir, lora=tmp_path / "lora", lora_scale=0.5).unet.state_dict()
    base = tiny_pipe.unet.state_dict()
    assert set(fused) == set(base)  # adapters unloaded after fusing
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed and all(k.endswith(("to_q.weight", "to_v.weight")) for k in changed)
    k = sorted(changed)[0]
    a = lora_sd[k.replace(".weight", ".lora_A.weight")]
    b = lora_sd[k.replace(".weight", ".lora_B.weight")]
    torch.testing.assert_close(fused[k], base[k] + 0.5 * (8 / 4) * b @ a)
    with pytest.raises(CheckpointError, match="LoRA weights not found"):
        load_pipeline(tiny_sd_dir, lora=tmp_path / "missing.safetensors")


def test_describe(tiny_sd_dir, tiny_ldm_file, tiny_pipe):
    info = describe(tiny_sd_dir)
    assert info["kind"] == "diffusers" and info["pipeline"] == "StableDiffusionPipeline"
    assert info["components"]["unet"]["params"] == sum(p.numel() for p in tiny_pipe.unet.parameters())
    assert info["params_total"] == sum(sum(p.numel() for p in getattr(tiny_pipe, n).parameters())
                                       for n in ("unet", "vae", "text_encoder"))
    assert info["scheduler"] == "PNDMScheduler" and info["prediction_type"] == "epsilon"
    assert info["resolution"] == 64 and info["latent_channels"] == 4 and info["dtype"] == "float32"
    json.dumps(info)
    single = describe(tiny_ldm_file)
    assert single["kind"] == "single_file" and single["params_total"] == info["params_total"]
    assert single["stored_dtypes"] == {"F32": 424, "I64": 1}  # + CLIP position_ids


# ------------------------------------------------------------------ latent preview

def test_latent_to_rgb_is_the_published_linear_map():
    lat = torch.zeros(2, 4, 3, 5)
    lat[0, 3] = 1.0  # channel L4 only
    rgb = latent_to_rgb(lat)
    assert rgb.shape == (2, 3, 3, 5)
    want = (torch.tensor(SD15_LATENT_RGB_FACTORS[3]) + 1) / 2
    torch.testing.assert_close(rgb[0, :, 1, 2], want)
    torch.testing.assert_close(rgb[1], torch.full((3, 3, 5), 0.5))
    u8 = latent_to_rgb(lat[0], uint8=True)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 3, 5)
    assert u8[:, 0, 0].tolist() == [round(float(v) * 255) for v in want]
    assert latent_to_rgb(torch.full((1, 4, 1, 1), 100.0)).max() == 1.0  # clamped
    biased = latent_to_rgb(torch.zeros(1, 4, 1, 1), bias=(0.2, 0.0, -0.2))
    torch.testing.assert_close(biased[0, :, 0, 0], torch.tensor([0.6, 0.5, 0.4]))
    with pytest.raises(ValueError, match=r"factors must be \[3, 3\]"):
        latent_to_rgb(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="latents must be"):
        latent_to_rgb(torch.zeros(4, 4))
