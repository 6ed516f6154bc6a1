"""``load_vae`` reads the sources the models loader reads: a single-file export gives the same VAE
as the diffusers folder it came from; pickles stay refused unless asked for."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError, UnsafeCheckpointError
from harness.estimator.dataset import load_vae, vae_identity


def test_load_vae_from_a_single_safetensors_file_matches_the_folder(tiny_sd_dir, tmp_path):
    from harness.models.export import export_single_file
    from harness.models.load import load_pipeline

    single = export_single_file(load_pipeline(tiny_sd_dir), tmp_path / "tiny.safetensors")
    from_dir, from_file = load_vae(tiny_sd_dir), load_vae(single)
    a, b = from_dir.state_dict(), from_file.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert from_file.config.scaling_factor == from_dir.config.scaling_factor
    assert vae_identity(from_file)["fingerprint"] == vae_identity(from_dir)["fingerprint"]
    assert not from_file.training


def test_load_vae_refuses_pickles_and_names_bad_sources(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="model.ckpt"):
        load_vae(ckpt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match="no vae/config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(HarnessError, match="unknown checkpoint file type"):
        load_vae(tmp_path / "notes.txt")
