"""Generation with the tiny zoo: reproducibility, batching invariance, grids, resume, refine, x-ray,
techniques and the CLI. 64 px images (8x8 latents), a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import ConfigError
from harness.generate.batch import generate, read_png_params
from harness.generate.grid import GridSpec, run_grid
from harness.generate.pipes import PipelineCache
from harness.generate.sample import Sample, decode_latents, denoise, encode_images, to_pil
from harness.io import read_jsonl

SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def cache(tiny_sd_dir):
    c = PipelineCache(device="cpu", dtype=torch.float32)
    c.get(str(tiny_sd_dir))
    return c


@pytest.fixture(scope="module")
def pipe(cache, tiny_sd_dir):
    return cache.get(str(tiny_sd_dir))


def _gen(pipe, samples, **kw):
    return denoise(pipe, samples, **SIZE, **kw)


def test_same_seed_is_identical_across_runs(pipe):
    samples = [Sample("a cat", seed=3, guidance_scale=5.0, steps=4), Sample("a dog", seed=4, steps=4)]
    a, b = _gen(pipe, samples), _gen(pipe, samples)
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images[0], a.images[1])  # different seeds differ
    assert a.stopped_at == [None, None] and a.finite == [True, True]


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpm++"])  # own (PNDM), stochastic, multistep
def test_sample_alone_equals_sample_inside_any_batch(pipe, scheduler):
    target = Sample("a red cat", seed=11, guidance_scale=6.0, steps=5)
    others = [Sample("a dog", seed=1, guidance_scale=1.0, steps=5), Sample("a red cat", seed=2, guidance_scale=9.0,
                                                                       steps=3, negative_prompt="blurry")]
    alone = _gen(pipe, [target], scheduler=scheduler)
    batched = _gen(pipe, [others[0], target, others[1]], scheduler=scheduler)
    assert (alone.images[0] - batched.images[1]).abs().max() < 1e-4
    assert (alone.latents[0] - batched.latents[1]).abs().max() < 1e-4


def test_single_sample_matches_the_diffusers_pipeline_call(pipe):
    ours = _gen(pipe, [Sample("a cat", seed=2, guidance_scale=7.0, steps=4)], scheduler="ddim")
    from harness.models.schedulers import make_scheduler

    own = pipe.scheduler
    try:
        pipe.scheduler = make_scheduler("ddim", own.config)
        ref = pipe("a cat", num_inference_steps=4, guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(2),
                   output_type="pt", **SIZE).images
    finally:
        pipe.scheduler = own
    assert (ours.images[0] - ref[0].cpu()).abs().max() < 1e-4


def test_callback_sees_every_step_and_can_stop_a_sample(pipe):
    seen = []

    def stop_second_after_step_one(state):
        seen.append((state["step"], list(state["samples"]), tuple(state["latents"].shape)))
        return [i == 1 and state["step"] == 1 for i in state["samples"]]

    samples = [Sample("a cat", seed=1, steps=4), Sample("a cat", seed=2, steps=4)]
    res = _gen(pipe, samples, callbacks=[stop_second_after_step_one], scheduler="ddim")
    assert res.stopped_at == [None, 1]
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[2][1] == [0] and seen[2][2][0] == 1  # the stopped sample leaves the batch
    alone = _gen(pipe, samples[:1], scheduler="ddim")
    assert (alone.images[0] - res.images[0]).abs().max() < 1e-4


def test_bad_size_and_empty_batch(pipe):
    with pytest.raises(ConfigError, match="width must be a positive multiple of 8; got 60"):
        denoise(pipe, [Sample("a", 0, steps=1)], width=60, height=64)
    with pytest.raises(ConfigError, match="sample list is empty"):
        denoise(pipe, [], **SIZE)
    with pytest.raises(ConfigError, match="scheduler 'nope' is not known"):
        denoise(pipe, [Sample("a", 0, steps=1)], scheduler="nope", **SIZE)


def _crop(grid_png, box):
    return np.asarray(Image.open(grid_png).convert("RGB").crop(tuple(box)), dtype=np.int16)


def test_grid_cells_match_single_generations_and_grid_json(pipe, cache, tiny_sd_dir, tmp_path):
    spec = GridSpec(checkpoint=str(tiny_sd_dir), prompt="a red cat", x="cfg=1,5", y="steps=2,4",
                    z="scheduler=ddim,euler", seeds=(7, 8), **SIZE, batch_size=16)
    data = run_grid(spec, tmp_path, progress=False, cache=cache)
    assert data["counts"] == {"generated": 16, "skipped": 0, "loads": 0}
    assert [p["file"] for p in data["pages"]] == ["grid_z0_p0.png", "grid_z1_p0.png"]
    assert (tmp_path / "overview.png").is_file() and data["overview"] == "overview.png"
    assert data["axes"]["x"]["values"] == [1.0, 5.0] and data["axes"]["z"]["labels"] == ["ddim", "euler"]
    assert data["fixed"]["prompt"] == "a red cat" and "guidance_scale" not in data["fixed"]
    assert json.loads((tmp_path / "grid.json").read_text())["cells"] == data["cells"]
    cell = next(c for c in data["cells"] if (c["x"], c["y"], c["z"]) == (1, 1, 1))
    assert [im["seed"] for im in cell["images"]] == [7, 8]  # both seeds kept
    single = to_pil(_gen(pipe, [Sample("a red cat", seed=8, guidance_scale=5.0, steps=4)], scheduler="euler").images)[0]
    page = data["pages"][1]
    box = next(b["box"] for b in page["boxes"] if (b["x"], b["y"], b["seed"]) == (1, 1, 8))
    diff = np.abs(_crop(tmp_path / page["file"], box) - np.asarray(single, dtype=np.int16))
    assert diff.max() <= 2  # batched float arithmetic, then uint8 rounding
    again = run_grid(spec, tmp_path, progress=False, cache=cache)
    assert again["counts"]["generated"] == 0 and again["counts"]["skipped"] == 16


def test_size_axis_grid_draws_mixed_sizes(cache, tiny_sd_dir, tmp_path):
    spec = GridSpec(checkpoint=str(tiny_sd_dir), prompt="a cat", x="size=64x64,32x48", steps=1)
    data = run_grid(spec, tmp_path, progress=False, cache=cache)
    boxes = {b["x"]: b["box"] for b in data["pages"][0]["boxes"]}
    assert (boxes[1][2] - boxes[1][0], boxes[1][3] - boxes[1][1]) == (32, 48)
    assert boxes[1][0] >= boxes[0][2]  # no overlap


def test_large_grid_is_paged(cache, tiny_sd_dir, tmp_path):
    spec = GridSpec(checkpoint=str(tiny_sd_dir), prompt="a cat", x="cfg=1-6", y="seed=1,2", steps=1, **SIZE,
                    max_grid_px=400, batch_size=12)
    data = run_grid(spec, tmp_path, progress=False, cache=cache)
    assert len(data["pages"]) > 1
    for p in data["pages"]:
        w, h = Image.open(tmp_path / p["file"]).size
        assert max(w, h) <= 400 + 200  # labels may take up to the margin pages reserve
    covered = {(b["x"], b["y"]) for p in data["pages"] for b in p["boxes"]}
    assert covered == {(x, y) for x in range(6) for y in range(2)}


def test_generate_is_resumable_and_pngs_carry_parameters(cache, tiny_sd_dir, tmp_path, monkeypatch):
    kw = dict(out=tmp_path, steps=2, guidance_scale=3.0, scheduler="ddim", **SIZE, progress=False, cache=cache,
              negative_prompt="blurry")
    res = generate([str(tiny_sd_dir)], ["a cat", "a dog"], [1, 2], **kw)
    assert res["generated"] == 4 and res["skipped"] == 0
    recs = read_jsonl(tmp_path / "generations.jsonl")
    assert len(recs) == 4
    meta = read_png_params(tmp_path / recs[0]["file"])
    assert meta["key"] == recs[0]["key"] and meta["prompt"] == "a cat" and meta["seed"] == 1
    assert meta["guidance_scale"] == 3.0 and meta["scheduler"] == "ddim" and meta["negative_prompt"] == "blurry"
    assert "Negative prompt: blurry" in Image.open(tmp_path / recs[0]["file"]).text["parameters"]
    mtimes = {r["file"]: (tmp_path / r["file"]).stat().st_mtime_ns for r in recs}
    assert generate([str(tiny_sd_dir)], ["a cat", "a dog"], [1, 2], **kw)["generated"] == 0
    # lost: one PNG; one jsonl line whose PNG landed (killed between the two writes)
    (tmp_path / recs[3]["file"]).unlink()
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    (tmp_path / "generations.jsonl").write_text("\n".join(lines[:2]) + "\n")
    res = generate([str(tiny_sd_dir)], ["a cat", "a dog"], [1, 2], **kw)
    assert res["generated"] == 1 and res["skipped"] == 3
    assert (tmp_path / recs[2]["file"]).stat().st_mtime_ns == mtimes[recs[2]["file"]]  # recovered, not redone
    assert {r["key"] for r in read_jsonl(tmp_path / "generations.jsonl")} == {r["key"] for r in recs}
    assert (tmp_path / "run.json").is_file()


def test_jobs_with_equal_parameters_but_different_files_are_all_generated(cache, tiny_sd_dir, tmp_path):
    # A held-out set with repeated captions gives equal (prompt, seed) jobs that must fill two files.
    from harness.generate.batch import Job, make_params, run_jobs

    params = make_params(str(tiny_sd_dir), "a cat", 1, steps=2, guidance_scale=3.0, **SIZE)
    jobs = [Job(params, "a/00000.png"), Job(params, "a/00001.png")]
    assert run_jobs(jobs, tmp_path, progress=False, cache=cache)["generated"] == 2
    assert (tmp_path / "a/00000.png").is_file() and (tmp_path / "a/00001.png").is_file()
    assert run_jobs(jobs, tmp_path, progress=False, cache=cache)["generated"] == 0


def _save_rgb(pipe, path, seed=1):
    img = to_pil(_gen(pipe, [Sample("a cat", seed=seed, steps=3)]).images)[0]
    img.save(path)
    return path


def test_refine_strength_zero_returns_input_up_to_vae_round_trip(pipe, tmp_path):
    from harness.generate.images import rgb_tensor
    from harness.generate.refine import refine, strength_for_timestep

    path = _save_rgb(pipe, tmp_path / "in.png")
    res, samples = refine(pipe, [path], "a cat", strengths=[0.0, 0.5, 1.0], steps=4, seed=3)
    assert [s.strength for s in samples] == [0.0, 0.5, 1.0]
    round_trip = decode_latents(pipe, encode_images(pipe, rgb_tensor(path)))
    assert (res.images[0] - round_trip[0]).abs().max() < 1e-4
    assert (res.images[1] - round_trip[0]).abs().max() > 1e-2
    fresh = _gen(pipe, [Sample("a cat", seed=3, steps=4)])  # strength 1 = a new generation
    assert (res.images[2] - fresh.images[0]).abs().max() < 1e-4
    # the largest strength whose first step is at or below t = 500 (PNDM repeats a timestep, so this
    # is not simply 500/1000: counting steps started refines "from 500" at 501)
    from harness.generate.sample import schedule

    st = strength_for_timestep(pipe, 500, 10)
    first = int(schedule(pipe, None, 10, st)[1][0])
    assert first <= 500 < int(schedule(pipe, None, 10, min(1.0, st + 0.1))[1][0])
    assert strength_for_timestep(pipe, 500, 10, "ddim") == pytest.approx(0.5, abs=1e-3)


def test_refine_bad_images(pipe, tmp_path):
    from harness.generate.refine import refine

    Image.new("RGBA", (64, 64)).save(tmp_path / "rgba.png")
    Image.new("RGB", (60, 64)).save(tmp_path / "odd.png")
    with pytest.raises(ConfigError, match="rgba.png: image mode is RGBA; expected RGB"):
        refine(pipe, [tmp_path / "rgba.png"], "a", steps=2)
    with pytest.raises(ConfigError, match="odd.png: size 60x64; width and height must be multiples of 8"):
        refine(pipe, [tmp_path / "odd.png"], "a", steps=2)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="junk.png: cannot read the image"):
        refine(pipe, [tmp_path / "junk.png"], "a", steps=2)


def test_refine_to_dir_writes_sweep(pipe, tmp_path):
    from harness.generate.refine import refine_to_dir

    path = _save_rgb(pipe, tmp_path / "in.png")
    data = refine_to_dir(pipe, [path], "a cat", tmp_path / "out", strengths=[0.25, 0.75], steps=4)
    assert [r["strength"] for r in data["images"]] == [0.25, 0.75]
    assert (tmp_path / "out" / "sweep.png").is_file() and (tmp_path / "out" / "refine.json").is_file()


def test_xray_has_one_entry_per_step(pipe, tmp_path):
    from harness.generate.xray import xray

    traces = xray(pipe, "a cat", out=tmp_path, seeds=(1,), steps=4, scheduler="ddim", vae_every=2, **SIZE)
    t = traces[0]
    assert t["num_steps"] == 4 and [s["step"] for s in t["steps"]] == [0, 1, 2, 3]
    ts = [s["timestep"] for s in t["steps"]]
    assert ts == sorted(ts, reverse=True)
    first = t["steps"][0]
    assert len(first["latent"]["channel_mean"]) == 4 and first["noise_pred"]["std"] > 0
    assert set(first["preview"]) == {"latent", "pred_x0", "pred_x0_vae"}
    assert "pred_x0_vae" not in t["steps"][1]["preview"] and "pred_x0_vae" in t["steps"][3]["preview"]
    on_disk = json.loads((tmp_path / "xray_s1.json").read_text())
    assert on_disk["num_steps"] == 4 and (tmp_path / on_disk["strip"]).is_file()
    # the trace's last latent is the generation's final latent, and its x0 estimate is close to it
    plain = _gen(pipe, [Sample("a cat", seed=1, steps=4)], scheduler="ddim")
    assert t["steps"][-1]["latent"]["mean"] == pytest.approx(float(plain.latents.mean()), abs=1e-5)
    assert t["steps"][-1]["latent"]["std"] == pytest.approx(float(plain.latents.std()), abs=1e-5)
    assert t["steps"][-1]["pred_x0"]["mean"] == pytest.approx(float(plain.latents.mean()), abs=1e-2)


def test_inpaint_keeps_the_known_region_and_checks_the_mask(pipe, tmp_path):
    from harness.generate import techniques as T
    from harness.generate.images import rgb_tensor

    path = _save_rgb(pipe, tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    res = T.inpaint(pipe, path, Image.fromarray(mask), "a dog", seeds=(4,), steps=4, scheduler="euler")
    known = encode_images(pipe, rgb_tensor(path))
    assert (res.latents[0, :, :, :4] - known[0, :, :, :4]).abs().max() < 1e-5
    assert (res.latents[0, :, :, 4:] - known[0, :, :, 4:]).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="mask is 32x32 but the image is 64x64"):
        T.inpaint(pipe, path, Image.new("L", (32, 32)), "a dog", steps=2)


def test_slerp_and_frequency_split():
    from harness.generate.techniques import gaussian_lowpass, slerp

    a, b = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 4, 8, 8)
    b[0, 0, 0, 0] = a.norm()
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert mid.norm() == pytest.approx(float(a.norm()), rel=1e-4)  # stays on the sphere; lerp would shrink
    x = torch.randn(2, 4, 16, 16)
    low = gaussian_lowpass(x, 2.0)
    assert low.std() < x.std() * 0.6
    assert torch.allclose(gaussian_lowpass(torch.full((1, 1, 8, 8), 3.0), 2.0), torch.full((1, 1, 8, 8), 3.0))


def test_anagram_hybrid_interpolate_run_and_are_deterministic(pipe):
    from harness.generate import techniques as T

    a1 = T.anagram(pipe, "a cat", "a dog", seeds=(1,), steps=2, **SIZE)
    a2 = T.anagram(pipe, "a cat", "a dog", seeds=(1,), steps=2, **SIZE)
    plain = _gen(pipe, [Sample("a cat", seed=1, steps=2)])
    assert torch.equal(a1.images, a2.images) and (a1.images - plain.images).abs().max() > 1e-3
    h = T.hybrid(pipe, "a cat", "a dog", seeds=(1,), steps=2, **SIZE)
    assert h.images.shape == (1, 3, 64, 64) and (h.images - plain.images).abs().max() > 1e-3
    it = T.interpolate(pipe, "a cat", 1, 2, frames=3, steps=2, **SIZE)
    ends = _gen(pipe, [Sample("a cat", seed=1, steps=2), Sample("a cat", seed=2, steps=2)])
    assert (it.images[0] - ends.images[0]).abs().max() < 1e-4 and (it.images[2] - ends.images[1]).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="view must be one of"):
        T.anagram(pipe, "a", "b", view="sideways", steps=1, **SIZE)


def test_cli_commands(tiny_sd_dir, tmp_path, capsys):
    from harness.cli import main

    model = str(tiny_sd_dir)
    assert main(["generate", "--model", model, "--prompt", "a cat", "--seeds", "1-2", "--steps", "2", "--width", "64",
                 "--height", "64", "--device", "cpu", "--out", str(tmp_path / "g")]) == 0
    assert len(read_jsonl(tmp_path / "g" / "generations.jsonl")) == 2
    assert main(["grid", "--model", model, "--prompt", "a cat", "--x", "colour=red", "--out", str(tmp_path / "x")]) == 2
    assert "axis 'colour' does not exist" in capsys.readouterr().err
    assert main(["grid", "--model", model, "--prompt", "a", "--x", "cfg=1-100 (+1)", "--y", "seed=1-3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "pass --max-cells 300" in capsys.readouterr().err
    (tmp_path / "spec.yaml").write_text(f"checkpoint: {model}\nprompt: a cat\nx: cfg=1,3\nsteps: 1\nwidth: 64\n"
                                        "height: 64\n")
    assert main(["grid", "--spec", str(tmp_path / "spec.yaml"), "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()
    assert main(["xray", "--model", model, "--prompt", "a", "--steps", "2", "--width", "64", "--height", "64",
                 "--device", "cpu", "--scheduler", "dpm_fancy", "--out", str(tmp_path / "xr")]) == 2
    assert "scheduler 'dpm_fancy' is not known" in capsys.readouterr().err
    assert main(["technique", "hybrid", "--model", model, "--prompt", "a", "--prompt-b", "b", "--steps", "1",
                 "--width", "64", "--height", "64", "--device", "cpu", "--out", str(tmp_path / "t")]) == 0
    assert read_png_params(tmp_path / "t" / "hybrid_000.png")["prompt_b"] == "b"
