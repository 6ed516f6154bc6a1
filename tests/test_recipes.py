"""Every shipped recipe loads, and each trains for 2 steps through `accelerate launch -m harness.train`
(the sd15-* ones pointed at the tiny zoo and 32 px images)."""

from __future__ import annotations

import json

import pytest
from _train_helpers import REPO, make_dataset, overrides, run_launch

from harness.errors import ConfigError
from harness.train.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_shipped_recipes_are_there():
    assert {p.name for p in RECIPES} >= {"sd15-full.yaml", "sd15-lora.yaml", "sd15-late-steps.yaml",
                                         "sd15-two-stage.yaml", "tiny-cpu.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    r = load_recipe(path)
    assert r.data.resolution % 8 == 0 and r.resolved_stages()


def test_recipes_mean_what_they_say():
    # seed 001: t in [250, 500) first (torch.randint(250, 500)), then [0, 250) from that model
    late = load_recipe(REPO / "recipes" / "sd15-late-steps.yaml")
    assert [(s.name, s.t_min, s.t_max) for s in late.resolved_stages()] == [("shape", 250, 500), ("detail", 0, 250)]
    assert not late.lora.enabled and all(0 <= t < 500 for t in late.validation.timesteps)
    two = load_recipe(REPO / "recipes" / "sd15-two-stage.yaml")
    assert [(s.name, s.epochs, s.lr) for s in two.resolved_stages()] == [("stage1", 30, 1e-6), ("stage2", 10, 1e-6)]
    lora = load_recipe(REPO / "recipes" / "sd15-lora.yaml", ["lora.text_encoder=true", "data.cache_text=false"])
    assert lora.lora.enabled and lora.lora.text_encoder and lora.train.mixed_precision == "bf16"  # inherited


@pytest.mark.parametrize("bad, match", [
    ("train.lrr=1", r"unknown key 'train.lrr'; did you mean 'lr'"),
    ("train.lr=fast", r"key 'train.lr' = 'fast': expected a number"),
    ("train.lr=2", r"key 'train.lr' = 2.0: expected a value between 0.0 and 1.0"),
    ("train.t_min=750 train.t_max=700", r"key 'train.t_max' = 700: expected more than train.t_min = 750"),
    ("train.lr_scheduler=cosine_warm", r"key 'train.lr_scheduler' = 'cosine_warm': expected one of 'linear'"),
    ("data.flip_p=0.5", r"key 'data.cache_latents' = True with random_crop/flip_p"),
    ("lora.text_encoder=true", r"lora.text_encoder' = True needs lora.enabled=true"),
])
def test_bad_overrides_are_one_line_errors(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe(REPO / "recipes" / "sd15-late-steps.yaml", bad.split(" "))
    assert "\n" not in str(e.value)


def test_print_recipe_shows_defaults(capsys):
    from harness.cli import main

    assert main(["train", str(REPO / "recipes" / "sd15-lora.yaml"), "train.lr=3e-5", "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert "lr: 3.0e-05" in text and "adam_beta2: 0.999" in text and "extends" not in text


SMOKE = {"train.max_steps": 2, "train.batch_size": 2, "train.mixed_precision": "no", "validation.num_inference_steps": 2,
         "validation.seeds": "[0]", "validation.max_items": 1, "checkpoint.single_file": False}


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_trains_two_steps_under_accelerate(path, tiny_sd_dir, tmp_path_factory):
    data = tmp_path_factory.getbasetemp() / "recipe-data"
    if not data.exists():
        make_dataset(data, n_train=8, n_val=2)
    out = tmp_path_factory.mktemp("run") / "out"
    args = [path, *overrides(tiny_sd_dir, data, out, data.parent / "recipe-cache", **SMOKE)]
    proc = run_launch(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and (out / "final" / "model_index.json").is_file()
    recipe = load_recipe(path)
    if recipe.lora.enabled:
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    if len(recipe.stages) > 1:
        assert (out / "stages" / recipe.stages[0].name / "model_index.json").is_file()
