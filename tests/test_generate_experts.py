"""Timestep experts (seed 001's late steps): a chain of UNets each owning a range of noise levels,
routed per sample and per step, with the base model everywhere else. Tiny zoo, CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from harness.cli import main as cli_main
from harness.errors import ConfigError
from harness.generate.experts import ExpertSpec, TimestepExperts, attach_experts, check_chain, parse_expert
from harness.generate.pipes import load
from harness.generate.refine import refine


@pytest.fixture(scope="module")
def experts(tiny_sd_dir, tmp_path_factory):
    """Two copies of the zoo model whose UNets differ from the base (so who ran shows in the output)."""
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for name, scale in (("a", 1.5), ("b", 0.5)):
        shutil.copytree(tiny_sd_dir, root / name)
        pipe = load(str(root / name), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            pipe.unet.conv_out.weight.mul_(scale)
        pipe.unet.save_pretrained(root / name / "unet")
        out[name] = root / name
    return out


def _image(path):
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


def _refine(pipe, path, **kw):
    return refine(pipe, [path], "a cat", timestep=500, steps=10, seed=1, **kw)[0].images


def test_parse_and_chain_errors():
    assert parse_expert("runs/a/final:250-500") == ExpertSpec("runs/a/final", 250, 500)
    with pytest.raises(ConfigError, match="expected CHECKPOINT:LO-HI"):
        parse_expert("runs/a/final")
    with pytest.raises(ConfigError, match="range 500-250 is empty"):
        parse_expert("x:500-250")
    a, b = ExpertSpec("a", 250, 500), ExpertSpec("b", 0, 250)
    assert check_chain([a, b], 1000) == [b, a]
    with pytest.raises(ConfigError, match="overlap on 200-250"):
        check_chain([ExpertSpec("b", 0, 250), ExpertSpec("c", 200, 260)], 1000)
    with pytest.raises(ConfigError, match="leave 200-250 to no expert"):
        check_chain([a, ExpertSpec("b", 0, 200)], 1000)
    with pytest.raises(ConfigError, match="HI may be at most 1000"):
        check_chain([ExpertSpec("a", 500, 1001)], 1000)


def test_identical_expert_changes_nothing_and_owners_run_their_ranges(tiny_sd_dir, experts, tmp_path):
    path = _image(tmp_path / "in.png")
    plain = _refine(load(str(tiny_sd_dir), device="cpu", dtype=torch.float32), path)
    same = load(str(tiny_sd_dir), device="cpu", dtype=torch.float32)
    attach_experts(same, [ExpertSpec(str(tiny_sd_dir), 0, 500)])
    assert torch.equal(_refine(same, path), plain)  # routing itself adds nothing

    chain = load(str(tiny_sd_dir), device="cpu", dtype=torch.float32)
    router = attach_experts(chain, [parse_expert(f"{experts['a']}:250-500"), parse_expert(f"{experts['b']}:0-250")])
    assert isinstance(chain.unet, TimestepExperts)
    out = _refine(chain, path)
    assert (out - plain).abs().max() > 1e-3
    # from t = 500 every step is at or below 500: the base never runs; each expert runs only its own
    # steps (two UNet rows per step: classifier-free guidance batches the unconditional half)
    from harness.generate.refine import strength_for_timestep
    from harness.generate.sample import schedule

    _, ts = schedule(chain, None, 10, strength_for_timestep(chain, 500, 10))
    ts = [int(t) for t in ts]
    a_steps = sum(250 <= t < 500 for t in ts)
    assert max(ts) <= 500 and 0 < a_steps < len(ts)
    assert router.calls == {f"{experts['a']}:250-500": 2 * a_steps, f"{experts['b']}:0-250": 2 * (len(ts) - a_steps)}
    assert router.owner(600) == -1 and router.owner(499) == 1 and router.owner(0) == 0


def test_incompatible_expert_is_refused_before_refining(tiny_sd_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_sd_dir, other)
    cfg = json.loads((other / "scheduler" / "scheduler_config.json").read_text())
    cfg["beta_schedule"] = "linear"
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    pipe = load(str(tiny_sd_dir), device="cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match="scheduler beta_schedule is 'linear', the base model's is 'scaled_linear'"):
        attach_experts(pipe, [ExpertSpec(str(other), 0, 500)])


def test_refine_command_with_a_chain(tiny_sd_dir, experts, tmp_path, capsys):
    path = _image(tmp_path / "in.png")
    out = tmp_path / "out"
    code = cli_main(["refine", str(path), "--prompt", "a cat", "--timestep", "500", "--steps", "10",
                     "--model", str(tiny_sd_dir), "--device", "cpu", "--out", str(out),
                     "--expert", f"{experts['a']}:250-500", "--expert", f"{experts['b']}:0-250"])
    assert code == 0
    data = json.loads((out / "refine.json").read_text())
    assert [(e["t_min"], e["t_max"]) for e in data["experts"]] == [(0, 250), (250, 500)]
    assert sum(data["denoised_by"].values()) == 2 * 5 and "base" not in data["denoised_by"]  # 5 steps <= 500
    with pytest.raises(SystemExit):
        cli_main(["refine", str(path), "--prompt", "a", "--model", str(tiny_sd_dir), "--out", str(out),
                  "--expert", "nope"])
    assert "expected CHECKPOINT:LO-HI" in capsys.readouterr().err
