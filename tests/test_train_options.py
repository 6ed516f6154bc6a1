"""Training options end to end on the tiny zoo: text-encoder LoRA, aspect buckets with the latent
cache, and early stopping that keeps the last step's weights when asked to."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _train_helpers import make_dataset, photo
from _train_helpers import quick_recipe as recipe
from safetensors.torch import load_file

from harness.io import read_jsonl
from harness.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def sample(pipe, prompt="a cat"):
    pipe.set_progress_bar_config(disable=True)
    return torch.from_numpy(pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images)


def test_text_encoder_lora_trains_both_towers_and_loads_in_diffusers(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    final = train(recipe(tiny_sd_dir, data, tmp_path, **{
        "lora.enabled": True, "lora.text_encoder": True, "data.cache_text": False, "train.lr": 0.05,
        "train.max_steps": 3, "checkpoint.single_file": False}))
    weights = load_file(str(final.parent / "lora" / "pytorch_lora_weights.safetensors"))
    te_keys = [k for k in weights if k.startswith("text_encoder.")]
    assert te_keys and any(k.startswith("unet.") for k in weights)
    # the text encoder's LoRA was trained: its up-projections left their zero start
    assert any(weights[k].abs().max() > 0 for k in te_keys if "lora_B" in k or ".up." in k)
    base_te = load_file(str(tiny_sd_dir / "text_encoder" / "model.safetensors"))
    fused_te = load_file(str(final / "text_encoder" / "model.safetensors"))
    assert any(not torch.equal(fused_te[k], v) for k, v in base_te.items() if k in fused_te)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = sample(pipe)
    pipe.load_lora_weights(str(final.parent / "lora"))
    with_lora = sample(pipe)
    assert not torch.allclose(before, with_lora)
    torch.testing.assert_close(sample(StableDiffusionPipeline.from_pretrained(final)), with_lora, atol=2e-3, rtol=0)


def make_shapes(root, size=32):
    """Four landscape, four portrait and four square photos (2:1, 1:2, 1:1) with captions."""
    d = root / "train"
    d.mkdir(parents=True)
    shapes = {"wide": (2 * size, size), "tall": (size, 2 * size), "square": (size, size)}
    for i in range(12):
        kind = list(shapes)[i % 3]
        photo(("astronaut", "coffee", "chelsea", "rocket")[i // 3], 2 * size).resize(shapes[kind]).save(
            d / f"{kind}-{i:02d}.png")
        (d / f"{kind}-{i:02d}.txt").write_text(f"a {kind} photo")
    return root


@pytest.mark.parametrize("cached", [True, False])
def test_aspect_buckets_train_with_and_without_the_latent_cache(tiny_sd_dir, tmp_path, cached):
    data = make_shapes(tmp_path / "data")
    final = train(recipe(tiny_sd_dir, data, tmp_path, **{
        "data.buckets": True, "data.bucket_step": 8, "train.batch_size": 2, "train.max_steps": 6,
        "data.cache_latents": cached, "logging.data_order": True}))
    steps = [r for r in read_jsonl(final.parent / "data_order" / "rank-0.jsonl") if "keys" in r]
    assert len(steps) == 6
    # every batch is one bucket, and the buckets are not all square
    from harness.data.buckets import make_buckets
    from harness.data.folder import scan_dataset
    from harness.data.loader import ImageCaptionDataset

    ds = ImageCaptionDataset(scan_dataset(data, split="train"), resolution=32, buckets=make_buckets(32, step=8))
    size_of = {ds[i]["key"]: tuple(ds[i]["pixel_values"].shape[1:]) for i in range(len(ds))}
    batch_sizes = [{size_of[k] for k in r["keys"]} for r in steps]
    assert all(len(s) == 1 for s in batch_sizes)
    assert {next(iter(s)) for s in batch_sizes} - {(32, 32)}, "no non-square bucket was trained"
    hw = {v for v in size_of.values()}
    assert any(h > w for h, w in hw) and any(w > h for h, w in hw)
    assert (final / "model_index.json").is_file()


def test_bucket_step_must_divide_the_resolution(tiny_sd_dir, tmp_path):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.bucket_step' = 24: expected a multiple of 8 that divides "
                                          r"data.resolution = 32"):
        recipe(tiny_sd_dir, tmp_path, tmp_path, **{"data.buckets": True, "data.bucket_step": 24})


def test_early_stopping_can_keep_the_stopping_weights(tiny_sd_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=1, size=32)
    final = train(recipe(tiny_sd_dir, data, tmp_path, **{
        "train.max_steps": 10, "validation.every_steps": 1, "validation.prompts": "[a cat]",
        "validation.eval_metrics": "[drift]", "validation.early_stopping_metric": "eval/drift",
        "validation.early_stopping_mode": "min", "validation.early_stopping_patience": 2,
        "validation.restore_best": False}))
    summary = json.loads((final.parent / "train_summary.json").read_text())
    # drift is 0 at step 0 and never lower after: best is step 0, the stop is at step 2
    assert summary["stopped"] == "early_stopping" and summary["best_step"] == 0
    assert summary["final_weights_step"] == 2 and not (final.parent / "best.safetensors").exists()
    base = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not np.array_equal(exported[k].numpy(), v.numpy()) for k, v in base.items())


def test_adamw8bit_trains_with_8bit_state_and_resumes(tiny_sd_dir, tmp_path):
    """bitsandbytes' AdamW8bit (its CPU backend here): 8-bit moments, and a checkpoint that resumes."""
    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    r = recipe(tiny_sd_dir, data, tmp_path, **{"train.optimizer": "adamw8bit", "train.max_steps": 3,
                                               "train.lr": 1e-3, "checkpoint.every_steps": 2})
    final = train(r)
    state = torch.load(final.parent / "checkpoints" / "step-00000002" / "optimizer.bin", weights_only=False)

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    dtypes = {t.dtype for t in tensors(state["state"])}
    assert torch.uint8 in dtypes  # the moments of large tensors are 8-bit (small ones stay fp32)
    # resuming restores the 8-bit state and continues to the same weights as the run that was not stopped
    resumed = recipe(tiny_sd_dir, data, tmp_path / "b", **{"train.optimizer": "adamw8bit", "train.max_steps": 3,
                                                            "train.lr": 1e-3, "checkpoint.every_steps": 2})
    import shutil

    shutil.copytree(final.parent / "checkpoints" / "step-00000002",
                    tmp_path / "b" / "run" / "checkpoints" / "step-00000002")
    again = train(resumed, resume="latest")
    a, b = (load_file(str(f / "unet" / "diffusion_pytorch_model.safetensors")) for f in (final, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [m["loss"] for m in read_jsonl(final.parent / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    base = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(exported[k], v) for k, v in base.items())


def test_wandb_tracker_logs_offline_into_the_run(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own switch: no account, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = make_dataset(tmp_path / "data", n_train=4, n_val=1, size=32)
    final = train(recipe(tiny_sd_dir, data, tmp_path, **{"logging.trackers": "[wandb]", "train.max_steps": 2}))
    runs = list((final.parent / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline W&B run under {final.parent / 'logs'}"
    logs = list(runs[0].glob("run-*.wandb"))
    assert logs and logs[0].stat().st_size > 0
    logged = wandb_history(logs[0].read_bytes())
    # what W&B holds is what metrics.jsonl holds
    ours = [m for m in read_jsonl(final.parent / "metrics.jsonl") if "loss" in m]
    theirs = [float(h["loss"]) for h in logged if "loss" in h]
    assert theirs == pytest.approx([m["loss"] for m in ours], rel=1e-6)
    assert any("loss" in h for h in logged) and any("val_loss" in h for h in logged)


def test_distributed_types_refused_or_allowed_with_the_alternative():
    from accelerate.utils import DistributedType

    from harness.errors import ConfigError
    from harness.train.accel import check_distributed_type

    with pytest.raises(ConfigError, match="distributed_type MEGATRON_LM is not supported .* use FSDP"):
        check_distributed_type(DistributedType.MEGATRON_LM, env={})
    with pytest.raises(ConfigError, match="fsdp_version 1 is not supported .* set fsdp_version: 2"):
        check_distributed_type(DistributedType.FSDP, 1, env={})
    # a launch config asking for sharding that accelerate dropped (CPU): each process would hold everything
    with pytest.raises(ConfigError, match=r"asks for FSDP \(ACCELERATE_USE_FSDP=true\) but accelerate set up "
                                          r"MULTI_CPU.*shards only on GPUs"):
        check_distributed_type(DistributedType.MULTI_CPU, env={"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ConfigError, match="asks for DEEPSPEED"):
        check_distributed_type(DistributedType.NO, env={"ACCELERATE_USE_DEEPSPEED": "True"})
    check_distributed_type(DistributedType.FSDP, 2, env={"ACCELERATE_USE_FSDP": "true"})
    check_distributed_type(DistributedType.DEEPSPEED, env={"ACCELERATE_USE_DEEPSPEED": "true"})
    for ok in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_distributed_type(DistributedType[ok], env={"ACCELERATE_USE_FSDP": "false"})


def wandb_history(data: bytes) -> list[dict]:
    """The history records of a W&B ``.wandb`` file: a LevelDB-style log (32 KiB blocks of records with a
    7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf ``Record``s after a 7-byte file
    header. wandb >= 0.31 ships no Python reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item})
        elif kind in (2, 3):
            buf = chunk if kind == 2 else buf + chunk
        else:
            pos += block - pos % block if pos % block else 0
    return out


def _fake_deepspeed_acc(config: dict, processes: int = 2):
    from types import SimpleNamespace

    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
                           num_processes=processes, is_main_process=True, gradient_accumulation_steps=1)


def test_deepspeed_config_checked_and_filled_from_the_recipe(tiny_sd_dir, tmp_path, caplog):
    from harness.errors import ConfigError
    from harness.train.accel import configure_deepspeed

    r = recipe(tiny_sd_dir, tmp_path, tmp_path, **{"train.batch_size": 3, "train.grad_accum": 4,
                                                   "train.max_grad_norm": 0.5})
    with pytest.raises(ConfigError, match=r"has an 'optimizer' section; harness.train builds the optimizer from "
                                          r"the recipe \(train.optimizer\): remove it"):
        configure_deepspeed(_fake_deepspeed_acc({"zero_optimization": {"stage": 2}, "optimizer": {}}), r)
    cfg = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": 1, "gradient_clipping": 0.5}
    acc = _fake_deepspeed_acc(cfg, processes=2)
    configure_deepspeed(acc, r)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["gradient_clipping"],
            cfg["train_batch_size"]) == (3, 4, 0.5, 24)
    assert acc.gradient_accumulation_steps == 4
    assert "gradient_accumulation_steps = 1 replaced by the recipe's train.grad_accum (4)" in caplog.text
    assert "gradient_clipping" not in caplog.text  # equal values are not reported
