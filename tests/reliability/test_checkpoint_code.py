"""Checkpoints as code, through every command that takes a checkpoint: a pickle whose unpickling would
write a marker file is refused (exit 2, one line) and never unpickled, with or without --allow-pickle
(weights_only=True); a safetensors header claiming a terabyte is refused; hub ids and local paths
are not confused. The library-level cases are in tests/test_models_load.py (pickle refusal,
weights_only, header validation without tensor reads, hub id vs path)."""

from __future__ import annotations

import json
import pickle
import re
import struct

import pytest
import torch

from harness.cli import main


class _WritesMarker:
    """Unpickling this creates ``path``: a stand-in for a malicious payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": _WritesMarker(marker)}
    files = {"ckpt": tmp_path / "evil.ckpt", "pt": tmp_path / "evil.pt", "disguised": tmp_path / "evil.safetensors"}
    torch.save(payload, files["ckpt"])
    files["pt"].write_bytes(pickle.dumps(payload, protocol=2))
    files["disguised"].write_bytes(files["ckpt"].read_bytes())
    return marker, files


def _error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [m.group(0) for ln in err.splitlines() if (m := re.search(r"harness \w+: error: .*", ln))]
    assert rc == 2 and len(lines) == 1, (rc, err)
    return lines[0]


def _commands(src, tmp_path, zoo_dir):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\nprompts: {{g: {{prompts: [a cat]}}}}\nmetrics: {{clip_score: {{}}}}\n"
                     f"models: {{clip: {zoo_dir / 'clip'}}}\ngeneration: {{width: 32, height: 32, steps: 1, batch_size: 1}}\n"
                     "xray: {samples: 0}\n")
    return {
        "info": ["info", src],
        "generate": ["generate", "--model", src, "--prompt", "a cat", "--out", tmp_path / "gen", "--steps", "1",
                     "--width", "32", "--height", "32"],
        "eval": ["eval", suite, "--base", zoo_dir / "sd", "--candidate", src, "--out", tmp_path / "ev"],
        "export": ["export", src, "--out", tmp_path / "exp"],
    }


@pytest.mark.parametrize("kind", ["ckpt", "pt", "disguised"])
@pytest.mark.parametrize("command", ["info", "generate", "eval", "export"])
def test_pickled_checkpoint_refused_by_every_command(evil, tmp_path, zoo_dir, capsys, kind, command):
    marker, files = evil
    argv = [str(a) for a in _commands(files[kind], tmp_path, zoo_dir)[command]]
    line = _error_line(capsys, main(argv))
    assert files[kind].name in line and ("pickle" in line or "arbitrary code" in line), line
    assert not marker.exists(), f"'harness {command}' unpickled {files[kind].name}"
    assert not list(tmp_path.rglob("*.png"))  # refused before anything was generated (eval: before the base)


@pytest.mark.parametrize("command", ["info", "generate", "eval"])
def test_allow_pickle_still_loads_with_weights_only(evil, tmp_path, zoo_dir, capsys, command):
    marker, files = evil
    argv = [str(a) for a in _commands(files["ckpt"], tmp_path, zoo_dir)[command]] + ["--allow-pickle"]
    line = _error_line(capsys, main(argv))
    assert "weights_only" in line, line
    assert not marker.exists()


def test_pickled_base_model_in_a_recipe_is_refused_before_training(evil, tmp_path, capsys):
    from _train_helpers import make_dataset

    marker, files = evil
    data = make_dataset(tmp_path / "data", n_train=2, n_val=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": str(files["ckpt"])}, "data": {"root": str(data),
                                  "resolution": 32}, "output_dir": str(tmp_path / "run"),
                                  "train": {"max_steps": 1}, "logging": {"trackers": []}}))
    line = _error_line(capsys, main(["train", str(recipe)]))
    assert "evil.ckpt" in line and "allow_pickle" in line.replace("-", "_"), line
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_terabyte_safetensors_header_refused_by_the_cli(tmp_path, capsys):
    tb = 1 << 40
    header = {"model.diffusion_model.x": {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, tb]},
              "first_stage_model.x": {"dtype": "F32", "shape": [1], "data_offsets": [tb, tb + 4]},
              "cond_stage_model.transformer.x": {"dtype": "F32", "shape": [1], "data_offsets": [tb + 4, tb + 8]}}
    body = json.dumps(header).encode()
    big = tmp_path / "big.safetensors"
    big.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00" * 64)
    line = _error_line(capsys, main(["info", str(big)]))
    assert "big.safetensors" in line and "1,099,511,627,776" in line
    claims = tmp_path / "hdr.safetensors"
    claims.write_bytes(struct.pack("<Q", tb) + b"{}")
    line = _error_line(capsys, main(["info", str(claims)]))
    assert "hdr.safetensors" in line and "header claims" in line


def test_hub_id_and_local_path_not_confused_by_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _error_line(capsys, main(["info", "runwayml/stable-diffusion-v1-5"]))
    assert "HF_HUB_OFFLINE" in line  # treated as a hub id (offline, not cached), not as a missing folder
    line = _error_line(capsys, main(["info", "./runwayml/stable-diffusion-v1-5"]))
    assert "not found" in line and "HF_HUB_OFFLINE" not in line  # a path stays a path
