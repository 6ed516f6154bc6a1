"""The ``harness`` command line: help, info, zoo build, export, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.cli import main
from harness.errors import CheckpointError


def test_console_help_lists_the_commands():
    # A real process: the entry point works and --help does not import the heavy libraries.
    r = subprocess.run([sys.executable, "-m", "harness", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("info", "zoo", "export"):
        assert f"\n    {name} " in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["info", "--help"], ["zoo", "build", "--help"], ["export", "--help"]])
def test_command_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: harness " + argv[0])
    assert {"info": "--json", "zoo": "--overwrite", "export": "--format"}[argv[0]] in out


def test_info_readable_and_json(tiny_sd_dir, capsys):
    assert main(["info", str(tiny_sd_dir)]) == 0
    out = capsys.readouterr().out
    assert "diffusers folder" in out and "UNet2DConditionModel" in out and "PNDMScheduler" in out
    assert "prediction type epsilon" in out and "params" in out
    assert main(["info", str(tiny_sd_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "diffusers" and info["components"]["text_encoder"]["class"] == "CLIPTextModel"


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["info", str(missing)]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(missing) in err[0] and "not found" in err[0]
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04K\x01.")
    assert main(["info", str(tmp_path / "evil.ckpt")]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "arbitrary code" in err[0] and "--allow-pickle" in err[0]


def _error_lines(stderr: str) -> list[str]:
    """stderr minus log records ("I harness...: ..."); fails on a traceback."""
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln[:2] not in ("I ", "W ", "D ")]
    assert lines and lines[0].startswith("harness info: error: ")
    return lines


def test_debug_flag_keeps_the_traceback(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        main(["--debug", "info", str(tmp_path / "nope.safetensors")])


def test_zoo_build_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "clip").mkdir()
    assert main(["zoo", "build", "tiny", "--out", str(tmp_path)]) == 2
    assert "clip: already exists; refusing to overwrite it (pass --overwrite)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # nothing half-built


def test_zoo_unknown_kind_lists_known(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["zoo", "build", "huge", "--out", str(tmp_path)])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_zoo_build_then_info_and_export(tmp_path, capsys, tiny_sd_dir):
    import torch

    from harness.models.load import load_pipeline

    out = tmp_path / "zoo"
    assert main(["zoo", "build", "tiny", "--out", str(out), "--seed", "3"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["blip", "clip", "sd", "yolo"]
    capsys.readouterr()
    seeded = load_pipeline(out / "sd").unet.state_dict()["conv_in.weight"]
    assert not torch.equal(seeded, load_pipeline(tiny_sd_dir).unet.state_dict()["conv_in.weight"])  # seed 3 vs 0
    single = tmp_path / "sd-fp16.safetensors"
    assert main(["export", str(out / "sd"), "--out", str(single), "--dtype", "fp16"]) == 0
    assert capsys.readouterr().out.strip() == str(single)
    assert main(["info", str(single), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "single_file" and info["stored_dtypes"]["F16"] > 0
    assert main(["export", str(out / "sd"), "--out", str(single)]) == 2
    assert "already exists" in capsys.readouterr().err
