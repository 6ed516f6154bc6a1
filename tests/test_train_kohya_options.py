"""What sd-scripts users reach for first (issue 19), each a recipe key: the text encoder's own learning
rate, clip skip, and prior-preservation images from a second folder with their own loss weight."""

from __future__ import annotations

import json

import pytest
import torch
from _train_helpers import REPO, make_dataset, photo
from _train_helpers import quick_recipe as recipe
from safetensors.torch import load_file

from harness.errors import ConfigError, HarnessError
from harness.io import read_jsonl
from harness.models.safety import read_safetensors_header
from harness.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_encoder_lr_is_its_own_group_in_every_stage():
    from harness.train.optim import build_lr_scheduler, build_optimizer
    from harness.train.recipe import StageCfg, load_recipe

    r = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ["model.source=x", "data.root=y", "output_dir=z",
                                                         "lora.enabled=true", "lora.text_encoder=true",
                                                         "data.cache_text=false", "train.text_encoder_lr=5e-5"])
    unet_p, te_p = [torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(r, unet_p, te_p)
    for stage_lr in (1e-4, 3e-4):
        build_lr_scheduler(opt, StageCfg(name="s", lr=stage_lr, warmup_steps=0), 10, "constant", 5e-5)
        assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("unet", stage_lr), ("text_encoder", 5e-5)]
    assert len(build_optimizer(r, unet_p).param_groups) == 1  # nothing else changes for UNet-only runs
    with pytest.raises(ValueError, match=r"train.text_encoder_lr' = 5e-05: the text encoder is not trained"):
        load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ["model.source=x", "data.root=y", "output_dir=z",
                                                         "train.text_encoder_lr=5e-5"])


def test_clip_skip_is_a1111s_and_diffusers_is_one_less(tiny_sd_dir):
    """A1111 / sd-scripts "clip skip 2" = the second-to-last layer through the final layer norm, which
    diffusers' own pipeline calls clip_skip=1: the two must give the same hidden states."""
    from types import SimpleNamespace

    from harness.models.load import load_pipeline
    from harness.train.cache import encode_text

    pipe = load_pipeline(tiny_sd_dir)
    te, tok = pipe.text_encoder, pipe.tokenizer
    if not hasattr(te, "text_model"):  # diffusers 0.42's clip_skip reads text_model, gone in transformers >= 5.6
        object.__setattr__(te, "text_model", SimpleNamespace(final_layer_norm=te.final_layer_norm))
    with torch.no_grad():
        last = encode_text(te, tok, ["a red apple"])
        one = encode_text(te, tok, ["a red apple"], clip_skip=1)
        two = encode_text(te, tok, ["a red apple"], clip_skip=2)
        theirs = pipe.encode_prompt("a red apple", "cpu", 1, False, clip_skip=1)[0]
    assert torch.equal(last, one) and not torch.allclose(last, two)
    torch.testing.assert_close(two, theirs, atol=1e-6, rtol=0)


def test_clip_skip_changes_the_text_cache_key(tiny_sd_dir, tmp_path):
    from harness.models.load import load_pipeline
    from harness.train.cache import TextCache

    pipe = load_pipeline(tiny_sd_dir)
    plain = TextCache(tmp_path, pipe.text_encoder, pipe.tokenizer)
    skip = TextCache(tmp_path, pipe.text_encoder, pipe.tokenizer, clip_skip=2)
    assert plain.store.dir != skip.store.dir  # one cache would feed the other's hidden states
    assert not torch.allclose(plain(["a cat"]), skip(["a cat"]))
    assert TextCache(tmp_path, pipe.text_encoder, pipe.tokenizer, clip_skip=1).store.dir == plain.store.dir


def test_lora_run_with_clip_skip_and_a_frozen_text_encoder_lr(tiny_sd_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    final = train(recipe(tiny_sd_dir, data, tmp_path, **{
        "lora.enabled": True, "lora.text_encoder": True, "data.cache_text": False, "train.lr": 0.05,
        "train.text_encoder_lr": 0.0, "train.clip_skip": 2, "train.max_steps": 2, "checkpoint.single_file": False}))
    weights = load_file(str(final.parent / "lora" / "pytorch_lora_weights.safetensors"))
    te_up = [v for k, v in weights.items() if k.startswith("text_encoder.") and "lora_B" in k]
    unet_up = [v for k, v in weights.items() if k.startswith("unet.") and "lora_B" in k]
    assert te_up and all(torch.equal(v, torch.zeros_like(v)) for v in te_up)  # lr 0: still at its zero start
    assert any(v.abs().max() > 0 for v in unet_up)
    meta = read_safetensors_header(final.parent / "lora" / f"{final.parent.name}.safetensors").metadata
    assert meta["ss_clip_skip"] == "2" and meta["ss_text_encoder_lr"] == "0" and meta["ss_unet_lr"] == "0.05"


def test_clip_skip_beyond_the_text_encoder_fails_before_training(tiny_sd_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    with pytest.raises(ConfigError, match=r"train.clip_skip' = 3: .* has 2 layers"):
        train(recipe(tiny_sd_dir, data, tmp_path, **{"train.clip_skip": 3}))
    assert not (tmp_path / "run" / "final").exists()


def _reg_folder(root, n: int):
    root.mkdir(parents=True)
    for i in range(n):
        photo("chelsea", 32).rotate(30 * i).save(root / f"cat{i}.png")
        (root / f"cat{i}.txt").write_text("a photo of a cat")
    return root


@pytest.mark.parametrize("n_reg,expected", [(2, [0, 1, 0, 1]), (6, [0, 1, 2, 3])])
def test_regularisation_images_balance_the_training_images(tiny_sd_dir, tmp_path, n_reg, expected):
    from harness.train.data import build_data

    data = make_dataset(tmp_path / "data", n_train=4, n_val=1, size=32)
    reg = _reg_folder(tmp_path / "reg", n_reg)
    r = recipe(tiny_sd_dir, data, tmp_path, **{"data.reg_root": reg, "data.reg_weight": 0.25})
    d = build_data(r, 1, 0)
    items = d.train.items
    assert d.reg_from == 4 and len(items) == 8 and d.steps_per_epoch == 8 // r.train.batch_size
    assert [int(it.path.stem.removeprefix("cat")) for it in items[4:]] == expected
    assert len(d.val) == 1  # held-out images come from data.root only


def test_regularisation_loss_is_scaled_by_its_weight(tiny_sd_dir, tmp_path):
    """Batch 1, one epoch of 4 training + 4 class images: with reg_weight 0 the class images' steps have
    a loss of exactly 0, the others do not; the weight reaches the loss, not just the data."""
    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    reg = _reg_folder(tmp_path / "reg", 4)
    final = train(recipe(tiny_sd_dir, data, tmp_path, **{
        "data.reg_root": reg, "data.reg_weight": 0.0, "train.batch_size": 1, "train.max_steps": 8,
        "checkpoint.single_file": False}))
    losses = [m["loss"] for m in read_jsonl(final.parent / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 8 and sum(v == 0.0 for v in losses) == 4 and all(v > 0 for v in losses if v != 0.0)
    summary = json.loads((final.parent / "train_summary.json").read_text())
    assert summary["recipe"]["data"]["reg_weight"] == 0.0


def test_missing_regularisation_folder_is_named(tiny_sd_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    with pytest.raises(HarnessError, match=r"data.reg_root = .*nope: no such folder"):
        train(recipe(tiny_sd_dir, data, tmp_path, **{"data.reg_root": tmp_path / "nope"}))
