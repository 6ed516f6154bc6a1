"""FSDP2 and DeepSpeed ZeRO-2/3 on two CPU processes (gloo): validation and sampling, the engines' own
checkpoints (with per-process EMA shards when parameters are sharded), an exact resume, and final weights
that match a DDP run of the same recipe; fp16 loss scaling under DDP and FSDP2
(``HARNESS_TEST_FP16_SCALER``). accelerate sets these engines up only on accelerators, so
``_cpu_engines.py`` switches its state after building the Accelerator; all the sharding code that runs is
accelerate's, torch's and DeepSpeed's."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from _train_helpers import REPO, accelerate_cmd, launch_env, make_dataset, overrides, run_launch

from harness.io import read_jsonl

pytestmark = pytest.mark.slow


def run_engine(engine: str, args: list, extra: tuple = (), env: dict | None = None) -> subprocess.CompletedProcess:
    launch = accelerate_cmd(2)[:-2]  # without its "-m harness.train"
    cmd = [*launch, str(REPO / "tests" / "_cpu_engines.py"), engine, *map(str, args), *extra]
    return subprocess.run(cmd, env={**launch_env(), **(env or {})}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fsdp-data"), n_train=8, n_val=2)


def recipe_args(sd_dir, data, out, cache, **extra) -> list:
    return [REPO / "recipes" / "tiny-cpu.yaml", *overrides(sd_dir, data, out, cache, **{
        "train.max_steps": 4, "train.batch_size": 2, "train.max_grad_norm": 1.0, "ema.enabled": True,
        "validation.every_steps": 2, "validation.prompts": "['a cat']", "validation.seeds": "[0]",
        "validation.eval_metrics": "[]", "checkpoint.every_steps": 2, "checkpoint.keep_last": 3,
        "logging.data_order": True, **extra})]


def test_fsdp2_trains_validates_resumes_exactly_and_matches_ddp(tiny_sd_dir, data, tmp_path):
    sharded, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    proc = run_engine("fsdp2", recipe_args(tiny_sd_dir, data, sharded, tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-4000:]

    ck = sharded / "checkpoints" / "step-00000002"
    assert (ck / "pytorch_model_fsdp_0").is_dir()  # accelerate's sharded (DCP) model state
    assert {p.name for p in ck.glob("ema*")} == {"ema.rank-000.safetensors", "ema.rank-001.safetensors"}
    # validation ran on the sharded weights (every process takes part), samples written once
    vals = [m for m in read_jsonl(sharded / "metrics.jsonl") if "val_loss" in m]
    assert [m["step"] for m in vals] == [0, 2, 4]
    assert [p.name for p in (sharded / "samples" / "step-00000004").glob("*.png")] == ["p00-s0.png"]
    # the exported weights are the whole model, EMA applied, and load in plain diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sharded / "final")
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(t.numel() for t in weights(sharded / "final").values())
    base = weights(tiny_sd_dir)
    assert max_diff(weights(sharded / "final"), base) > 1e-4

    # the same recipe under DDP: the same data per rank and the same noise, so (up to the order of float
    # sums in reduce-scatter vs all-reduce) the same weights
    proc = run_launch(recipe_args(tiny_sd_dir, data, ddp, tmp_path / "cache"), num_processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert max_diff(weights(sharded / "final"), weights(ddp / "final")) < 1e-5

    # resume from the step-2 checkpoint (drop everything after it): bit-identical final weights
    shutil.copytree(sharded, resumed)
    for p in ("final", "final.safetensors", "train_summary.json", "checkpoints/step-00000004"):
        shutil.rmtree(resumed / p) if (resumed / p).is_dir() else (resumed / p).unlink()
    proc = run_engine("fsdp2", recipe_args(tiny_sd_dir, data, resumed, tmp_path / "cache"), ("--resume", "latest"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "step-00000002" in proc.stderr
    assert max_diff(weights(sharded / "final"), weights(resumed / "final")) == 0.0


def lora_weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def test_fsdp2_lora_exports_the_adapter_alone_and_matches_ddp(tiny_sd_dir, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    lora = {"lora.enabled": True, "ema.enabled": False, "train.max_steps": 2, "validation.every_steps": 0,
            "checkpoint.every_steps": 0}
    sharded, ddp, bf16 = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "bf16"
    proc = run_engine("fsdp2", recipe_args(tiny_sd_dir, data, sharded, tmp_path / "cache", **lora))
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_launch(recipe_args(tiny_sd_dir, data, ddp, tmp_path / "cache", **lora), num_processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = lora_weights(sharded), lora_weights(ddp)
    assert a.keys() == b.keys() and any(("lora.up" in k or "lora_B" in k) for k in a)
    assert max_diff(a, b) < 1e-5
    assert max(t.abs().max().item() for k, t in a.items() if ("lora.up" in k or "lora_B" in k)) > 0  # starts at zero: it trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(sharded / "lora")
    # bf16 under FSDP2: accelerate's mixed-precision policy all-gathers in bf16, LoRA weights train in fp32
    proc = run_engine("fsdp2", recipe_args(tiny_sd_dir, data, bf16, tmp_path / "cache", **lora, **{"train.mixed_precision": "bf16"}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(t.dtype == torch.float32 for t in weights(bf16 / "final").values())
    assert max_diff(lora_weights(bf16), a) < 1e-2


def test_fsdp2_refuses_text_encoder_lora_before_any_work(tiny_sd_dir, data, tmp_path):
    out = tmp_path / "run"
    proc = run_engine("fsdp2", recipe_args(tiny_sd_dir, data, out, tmp_path / "cache", **{
        "lora.enabled": True, "lora.text_encoder": True, "data.cache_text": False}))
    assert proc.returncode != 0
    assert "key 'lora.text_encoder' = true: under FSDP accelerate prepares one model" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "recipe.yaml").exists()


@pytest.fixture(scope="module")
def ddp_accumulating(tiny_sd_dir, data, tmp_path_factory):
    """The DeepSpeed tests' reference: the same recipe under DDP."""
    out = tmp_path_factory.mktemp("ddp-accum") / "run"
    proc = run_launch(recipe_args(tiny_sd_dir, data, out, out.parent / "cache", **DS_ARGS), num_processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


# accumulation 2 at batch 1: the engine must step at the boundary only, and scale the loss itself
DS_ARGS = {"train.batch_size": 1, "train.grad_accum": 2}


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_accumulates_clips_resumes_exactly_and_matches_ddp(engine, tiny_sd_dir, data, ddp_accumulating,
                                                                     tmp_path):
    zero, resumed = tmp_path / engine, tmp_path / "resumed"
    proc = run_engine(engine, recipe_args(tiny_sd_dir, data, zero, tmp_path / "cache", **DS_ARGS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    # accelerate's config said 1; the recipe's accumulation wins, and says so
    assert "DeepSpeed config gradient_accumulation_steps = 1 replaced by the recipe's train.grad_accum (2)" in proc.stderr
    ck = zero / "checkpoints" / "step-00000002"
    # ZeRO-3 partitions the parameters, so each process keeps the EMA of its own partition
    ema = {"zero2": {"ema.safetensors"}, "zero3": {"ema.rank-000.safetensors", "ema.rank-001.safetensors"}}[engine]
    assert (ck / "pytorch_model").is_dir() and {p.name for p in ck.glob("ema*")} == ema
    assert [m["step"] for m in read_jsonl(zero / "metrics.jsonl") if "val_loss" in m] == [0, 2, 4]
    assert max_diff(weights(zero / "final"), weights(tiny_sd_dir)) > 1e-4
    assert max_diff(weights(zero / "final"), weights(ddp_accumulating / "final")) < 1e-5

    shutil.copytree(zero, resumed)
    for p in ("final", "final.safetensors", "train_summary.json", "checkpoints/step-00000004"):
        shutil.rmtree(resumed / p) if (resumed / p).is_dir() else (resumed / p).unlink()
    proc = run_engine(engine, recipe_args(tiny_sd_dir, data, resumed, tmp_path / "cache", **DS_ARGS),
                      ("--resume", "latest"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "step-00000002" in proc.stderr
    assert max_diff(weights(zero / "final"), weights(resumed / "final")) == 0.0

    # bf16 LoRA: the engine casts the UNet itself and autocasts nothing, so the loop feeds it bf16 inputs;
    # under ZeRO-3 the frozen base weights are partitioned too and the export gathers them
    bf16 = tmp_path / "bf16"
    proc = run_engine(engine, recipe_args(tiny_sd_dir, data, bf16, tmp_path / "cache", **DS_ARGS, **{
        "lora.enabled": True, "train.mixed_precision": "bf16", "train.max_steps": 2, "validation.every_steps": 0,
        "checkpoint.every_steps": 0}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(t.dtype == torch.float32 for t in weights(bf16 / "final").values())
    assert max(t.abs().max().item() for k, t in lora_weights(bf16).items() if ("lora.up" in k or "lora_B" in k)) > 0


def test_fsdp2_early_stopping_exports_the_best_steps_weights_from_every_shard(tiny_sd_dir, data, tmp_path):
    # drift from the base model's samples is 0 at step 0 and grows: the best (min) is step 0, so training
    # stops at the next validation and final/ must be the base weights exactly, put back shard by shard
    out = tmp_path / "run"
    proc = run_engine("fsdp2", recipe_args(tiny_sd_dir, data, out, tmp_path / "cache", **{
        "validation.eval_metrics": "['drift']", "validation.early_stopping_metric": "eval/drift",
        "validation.early_stopping_patience": 1, "checkpoint.every_steps": 0}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name for p in out.glob("best*")} == {"best.rank-000.safetensors", "best.rank-001.safetensors"}
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["stopped"], summary["steps"], summary["final_weights_step"]) == ("early_stopping", 2, 0)
    assert max_diff(weights(out / "final"), weights(tiny_sd_dir)) == 0.0


def test_fp16_overflow_skips_the_same_steps_on_every_rank_under_ddp_and_fsdp2(tiny_sd_dir, data, tmp_path):
    """A step is skipped on every process or on none: one rank stepping while another skips would leave
    DDP replicas (or FSDP2 shards) from different steps. Under FSDP2 each process unscales only its own
    shards of the gradients, so an overflow in one shard must skip the step everywhere. A huge initial
    loss scale with a steep back-off makes the first steps overflow."""
    # (the first applied step has the schedule's first LR, 0 under warm-up: the skips did not move it)
    fp16 = {"train.mixed_precision": "fp16", "train.max_steps": 6, "train.warmup_steps": 2, "validation.every_steps": 0,
            "validation.prompts": "[]", "checkpoint.every_steps": 0}
    env = {"HARNESS_TEST_FP16_SCALER": json.dumps({"init_scale": 2.0**60, "backoff_factor": 2.0**-20})}
    runs = {}
    for engine in ("ddp", "fsdp2"):
        out = tmp_path / engine
        proc = run_engine(engine, recipe_args(tiny_sd_dir, data, out, tmp_path / "cache", **fp16), env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[engine] = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
        skipped = [m["skipped_steps"] for m in runs[engine]]
        assert 1 <= skipped[-1] < 5, skipped
    # the same steps skipped, the same scale, the same LR schedule under both
    for key in ("skipped_steps", "loss_scale", "lr"):
        assert [m[key] for m in runs["ddp"]] == [m[key] for m in runs["fsdp2"]], key
    # DDP: both replicas hold the same weights at the end
    ends = [read_jsonl(tmp_path / "ddp" / "data_order" / f"rank-{r}.jsonl")[-1]["unet_sha256"] for r in (0, 1)]
    assert ends[0] == ends[1]
    # fp16 compute: FSDP2 casts the gathered parameters, DDP's autocast each op's inputs; close, not equal
    assert max_diff(weights(tmp_path / "ddp" / "final"), weights(tmp_path / "fsdp2" / "final")) < 1e-3
    assert max_diff(weights(tmp_path / "fsdp2" / "final"), weights(tiny_sd_dir)) > 1e-4
