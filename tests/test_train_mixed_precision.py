"""bf16 mixed precision on the CPU (accelerate supports it there): two steps of the tiny-cpu recipe run,
the loss is finite, and the exported weights are fp32 and load in plain diffusers. fp16 needs a GPU for
users (accelerate gives no loss scaling on the CPU); tests/test_train_fp16.py runs its code path here."""

from __future__ import annotations

import math

import pytest
import torch
from _train_helpers import REPO, make_dataset, overrides

from harness.io import read_jsonl
from harness.train.loop import train_from_file

TINY = REPO / "recipes" / "tiny-cpu.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4, n_val=2, size=32)


def _run(tiny_sd_dir, data_dir, tmp_path, precision: str, **extra):
    return train_from_file(TINY, overrides(
        tiny_sd_dir, data_dir, tmp_path / "run", tmp_path / "cache", **{
            "train.mixed_precision": precision, "train.max_steps": 2, "train.cpu": True,
            "validation.prompts": "[]", "validation.eval_metrics": "[]", "validation.every_steps": 2,
            "checkpoint.every_steps": 0, **extra}))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_trains_on_cpu_and_exports_fp32(tiny_sd_dir, data_dir, tmp_path, lora):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    final = _run(tiny_sd_dir, data_dir, tmp_path, "bf16", **({"lora.enabled": True, "lora.rank": 4} if lora else {}))
    logged = read_jsonl(final.parent / "metrics.jsonl")
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(m["val_loss"]) for m in logged if "val_loss" in m)
    for part in ("unet", "vae", "text_encoder"):
        path = next((final / part).glob("*.safetensors"))
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F32", "I64"}, part
    pipe = StableDiffusionPipeline.from_pretrained(final)
    assert pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(img)).all()


def test_precision_can_change_between_runs_in_one_process(tiny_sd_dir, data_dir, tmp_path):
    from harness.train.accel import build_accelerator
    from harness.train.recipe import load_recipe

    def acc(precision):
        r = load_recipe(TINY, overrides(tiny_sd_dir, data_dir, tmp_path / "run", tmp_path / "cache",
                                        **{"train.mixed_precision": precision, "train.cpu": True}))
        return build_accelerator(r, tmp_path / "run")

    # accelerate alone raises "AcceleratorState has already been initialized" on the second and third call
    assert [acc(p).mixed_precision for p in ("no", "bf16", "no")] == ["no", "bf16", "no"]


def test_fp16_on_the_cpu_is_refused_before_any_work(tiny_sd_dir, data_dir, tmp_path):
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'train.mixed_precision' = 'fp16': needs a GPU .* use bf16 or no"):
        _run(tiny_sd_dir, data_dir, tmp_path, "fp16")
    assert not (tmp_path / "run").exists()


def test_the_eval_hook_scores_in_full_precision_under_bf16(tiny_sd_dir, data_dir, tmp_path):
    """The samples come from the model as it trains (bf16 autocast); the scorers run as 'harness eval'
    runs them, so the in-training CLIP or artifact score compares with the eval suite's."""
    autocast_on = []

    def probe(images, prompts):
        autocast_on.append(torch.is_autocast_enabled("cpu"))
        return 0.0

    final = train_from_file(TINY, overrides(
        tiny_sd_dir, data_dir, tmp_path / "run", tmp_path / "cache", **{
            "train.mixed_precision": "bf16", "train.max_steps": 2, "train.cpu": True, "validation.every_steps": 2,
            "validation.prompts": "['a cat']", "validation.eval_metrics": "[probe]", "checkpoint.every_steps": 0}),
        scorers={"probe": probe})
    assert autocast_on == [False, False]  # step 0 and step 2
    assert [m["eval/probe"] for m in read_jsonl(final.parent / "metrics.jsonl") if "eval/probe" in m] == [0.0, 0.0]
