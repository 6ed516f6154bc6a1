"""Axis parsing, scheduler registry, grid planning and page splitting: pure logic, no model."""

from __future__ import annotations

import pytest

from harness.errors import ConfigError
from harness.generate.axes import parse_axis
from harness.generate.grid import GridSpec, ordered_jobs, plan_grid
from harness.generate.grid_draw import pages
from harness.models.schedulers import canonical_scheduler, make_scheduler, scheduler_names
from harness.models.tiny import SD15_SCHEDULER


@pytest.mark.parametrize("spec, name, values", [
    ("cfg=1,4,7", "cfg", (1.0, 4.0, 7.0)),
    ("cfg=4,7.5,12", "cfg", (4.0, 7.5, 12.0)),
    ("steps=10-30 (+10)", "steps", (10, 20, 30)),
    ("seed=1-10 (+2)", "seed", (1, 3, 5, 7, 9)),
    ("seed=1-3, 7", "seed", (1, 2, 3, 7)),
    ("steps=30-10 (-10)", "steps", (30, 20, 10)),
    ("steps=3-1", "steps", (3, 2, 1)),
    ("cfg=1-2 [5]", "cfg", (1.0, 1.25, 1.5, 1.75, 2.0)),
    ("guidance=2", "cfg", (2.0,)),
    ("prompt=[a cat, 'a dog, red']", "prompt", ("a cat", "a dog, red")),
    ("scheduler=DDIM, euler_a, DPMSolverMultistepScheduler", "scheduler", ("ddim", "euler_a", "dpm++")),
    ("size=512x768, 64x64", "size", ((512, 768), (64, 64))),
    ("checkpoint=[a/b, ./c]", "checkpoint", ("a/b", "./c")),
    ("lora_scale=0-1 [3]", "lora_scale", (0.0, 0.5, 1.0)),
])
def test_parse_axis(spec, name, values):
    axis = parse_axis(spec)
    assert axis.name == name
    assert axis.values == values
    assert len(axis.labels) == len(values)


def test_prompt_search_replace_keeps_first_value_as_is():
    axis = parse_axis("prompt_sr=cat,dog,bird")
    assert axis.search == "cat"
    prompts = [axis.apply({"prompt": "a cat on a cat mat"}, i)["prompt"] for i in range(3)]
    assert prompts == ["a cat on a cat mat", "a dog on a dog mat", "a bird on a bird mat"]
    with pytest.raises(ConfigError, match="'cat' does not occur in the prompt"):
        axis.apply({"prompt": "a horse"}, 1)


@pytest.mark.parametrize("spec, match", [
    ("xyzzy=1,2", r"axis .xyzzy. does not exist; valid axes: cfg, steps, scheduler"),
    ("cgf=1", r"did you mean cfg"),
    ("cfg", r"expected NAME=VALUES"),
    ("cfg=", r"no values given"),
    ("steps=30-10 (+10)", r"yields no values"),
    ("steps=1-5 (+0)", r"step 0"),
    ("seed=0-999999", r"yields 1000000 values"),
    ("cfg=1-2 [0]", r"yields 0 values"),
    ("cfg=high", r"'high' is not a number"),
    ("steps=1.5", r"'1.5' is not an integer"),
    ("steps=0", r"between 1 and 1000"),
    ("width=100", r"multiple of 8"),
    ("size=64by64", r"not a size like 512x768"),
    ("scheduler=ddim,k_dpm_fancy", r"scheduler 'k_dpm_fancy' is not known.*known schedulers: ddim, euler"),
    ("prompt=[a, b", r"not a valid \[a, b, ...\] list"),
    ("cfg=1,,2", r"empty item"),
])
def test_parse_axis_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_axis(spec)


def test_scheduler_registry_builds_every_name_and_ddim_does_not_clip():
    cfg = {**SD15_SCHEDULER, "clip_sample": True}
    for name in scheduler_names():
        sched = make_scheduler(name, cfg)
        assert sched.config.num_train_timesteps == 1000
    assert make_scheduler("ddim", cfg).config.clip_sample is False
    assert make_scheduler("ddpm", {k: v for k, v in cfg.items() if k != "clip_sample"}).config.clip_sample is False
    assert make_scheduler("dpm++_karras", cfg).config.use_karras_sigmas is True
    assert canonical_scheduler("Euler Ancestral") == "euler_a"
    assert canonical_scheduler("PNDMScheduler") == "pndm"
    with pytest.raises(ConfigError, match=r"scheduler 'eulr' is not known \(did you mean euler"):
        canonical_scheduler("eulr")


def test_plan_grid_cells_seeds_and_parameters():
    spec = GridSpec(checkpoint="ck", prompt="a cat", x="cfg=1,4,7", y="steps=10-30 (+10)", z="prompt_sr=cat,dog",
                    seeds=(5, 6))
    plan = plan_grid(spec)
    assert len(plan.cells) == 3 * 3 * 2
    assert len(plan.jobs) == 36 and plan.seeds == [5, 6]
    c = plan.cell(2, 1, 1)
    assert c.params["guidance_scale"] == 7.0 and c.params["steps"] == 20 and c.params["prompt"] == "a dog"
    assert [j.params["seed"] for j in c.jobs] == [5, 6]  # every image of a multi-seed cell is kept
    assert len({j.file for j in plan.jobs}) == 36


def test_plan_grid_seed_axis_and_prompt_axis_with_search_replace():
    plan = plan_grid(GridSpec(checkpoint="ck", x="seed=1-3", y="prompt=[a red cat, a red dog]", z="prompt_sr=red,blue"))
    assert [j.params["seed"] for j in plan.jobs[:3]] == [1, 2, 3]
    assert plan.cell(0, 1, 1).params["prompt"] == "a blue dog"


@pytest.mark.parametrize("kwargs, match", [
    (dict(x="cfg=1-100 (+1)", y="seed=1-10"), r"1000 images .* pass --max-cells 1000 to confirm"),
    (dict(x="cfg=1,2", y="guidance=3,4"), r"both set guidance_scale"),
    (dict(x="size=64x64", y="width=64,128"), r"both set width"),
    (dict(x="cfg=1", seeds=()), r"at least one seed"),
    (dict(x="lora_scale=0,1"), r"axis lora_scale needs LoRA weights"),
])
def test_plan_grid_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        plan_grid(GridSpec(checkpoint="ck", prompt="p", **kwargs))


def test_plan_grid_needs_checkpoint_and_prompt():
    with pytest.raises(ConfigError, match="give a checkpoint"):
        plan_grid(GridSpec(prompt="p", x="cfg=1"))
    with pytest.raises(ConfigError, match="give a prompt"):
        plan_grid(GridSpec(checkpoint="c", x="cfg=1"))
    assert len(plan_grid(GridSpec(prompt="p", x="checkpoint=[a, b]")).jobs) == 2


def test_ordering_switches_checkpoint_and_scheduler_least():
    # checkpoint on the fast-varying x axis: naive row-major order would switch models 8 times
    plan = plan_grid(GridSpec(prompt="p", x="checkpoint=[A, B]", y="cfg=1,2", z="scheduler=ddim,euler"))
    seq = [(j.params["checkpoint"], j.params["scheduler"]) for j in ordered_jobs(plan)]
    model_switches = sum(a[0] != b[0] for a, b in zip(seq, seq[1:]))
    sched_switches = sum(a != b for a, b in zip(seq, seq[1:]))
    assert model_switches == 1
    assert sched_switches == 3  # (A,ddim) (A,euler) (B,ddim) (B,euler)


def test_pages_split_large_grids_and_cover_every_cell():
    splits = pages(n_rows=5, n_cols=7, cell_w=100, cell_h=100, max_px=500, margin=200)
    assert len(splits) == 2 * 3
    covered = {(r, c) for rows, cols in splits for r in rows for c in cols}
    assert covered == {(r, c) for r in range(5) for c in range(7)}
    assert all(len(rows) <= 3 and len(cols) <= 3 for rows, cols in splits)
    assert pages(2, 2, 100, 100, 4096) == [([0, 1], [0, 1])]
