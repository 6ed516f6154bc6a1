"""Two CPU processes (accelerate launch --multi_gpu with a CPU Accelerator: gloo DDP) see disjoint data
and end holding exactly the weights that were saved."""

from __future__ import annotations

import pytest
from _train_helpers import REPO, make_dataset, overrides, run_launch

from harness.io import read_jsonl
from harness.train.cache import module_hash


@pytest.mark.slow
def test_two_processes_disjoint_data_identical_weights(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    data = make_dataset(tmp_path / "data", n_train=8, n_val=0)
    out = tmp_path / "run"
    args = [REPO / "recipes" / "tiny-cpu.yaml", *overrides(tiny_sd_dir, data, out, tmp_path / "cache", **{
        "train.max_steps": 3, "train.batch_size": 2, "logging.data_order": True, "validation.prompts": "[]",
        "validation.eval_metrics": "[]", "checkpoint.every_steps": 0})]
    proc = run_launch(args, num_processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [read_jsonl(out / "data_order" / f"rank-{r}.jsonl") for r in (0, 1)]
    seen = [[k for rec in log if "keys" in rec for k in rec["keys"]] for log in logs]
    for rank_seen in seen:
        assert len(rank_seen) == 6  # 3 steps x batch 2
    # within each epoch (2 steps of 2 per rank = all 8 images) the ranks never share an image
    for epoch_start in (0, 4):
        a, b = set(seen[0][epoch_start:epoch_start + 4]), set(seen[1][epoch_start:epoch_start + 4])
        assert not a & b
    assert len(set(seen[0][:4]) | set(seen[1][:4])) == 8  # together they cover the epoch
    held = [log[-1]["unet_sha256"] for log in logs]
    assert held[0] == held[1]
    saved = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    assert module_hash(saved) == held[0]
    assert module_hash(UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")) != held[0]
