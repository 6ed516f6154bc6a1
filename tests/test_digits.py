"""The digits world's data, styles and builders (fast checks; the trained world is in test_demo.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.world import digits as D
from harness.world import digits_data as DD
from harness.world import digits_judges as DJ
from harness.world import digits_sd as DS


def test_caption_names_digit_and_style():
    assert DD.caption(7) == "a handwritten digit seven"
    assert DD.caption(0, ("red", "cream")) == "a handwritten digit zero in red ink on cream paper"


def test_split_is_deterministic_disjoint_and_complete():
    a_train, a_held = DD.split_indices(1797, seed=3)
    b_train, b_held = DD.split_indices(1797, seed=3)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_held, b_held)
    assert not set(a_train) & set(a_held)
    assert len(a_train) + len(a_held) == 1797
    assert len(a_held) == round(1797 * DD.HELD_OUT_FRACTION)
    assert not np.array_equal(DD.split_indices(1797, seed=4)[1], a_held)


def test_render_puts_ink_colour_on_strokes_and_paper_elsewhere():
    ink = torch.zeros(1, 1, 4, 4)
    ink[..., 0, 0] = 1.0
    img = DD.render_style(ink, ("red", "cream"))
    assert torch.allclose(img[0, :, 0, 0], torch.tensor(DD.INKS["red"]))
    assert torch.allclose(img[0, :, 3, 3], torch.tensor(DD.PAPERS["cream"]))


def test_classifier_reads_real_digits_in_any_named_style():
    """The judge of "is it the prompted digit" must work on held-out scans, plain or restyled."""
    ink, y = DD.load_ink()
    assert ink.shape == (1797, 1, 32, 32) and 0 <= ink.min() and ink.max() <= 1
    _, held = DD.split_indices(len(y), 0)
    clf = DJ.digit_classifier(0)
    for style in (DD.PLAIN, DD.DEMO_STYLE, ("blue", "gray")):
        acc = DJ.prompted_accuracy(DD.render_style(ink[held], style), y[held], clf)
        assert acc > 0.8, (style, acc)
    # a shuffled-label control stays near chance, so the number above means something
    assert DJ.prompted_accuracy(DD.render_style(ink[held], DD.PLAIN), np.roll(y[held], 1), clf) < 0.3


def test_styled_batch_is_seeded_and_labels_match():
    ink, y = DD.load_ink()
    idx = torch.arange(64)
    a = DD.styled_batch(ink, y, idx, DD.all_styles(), torch.Generator().manual_seed(1))
    b = DD.styled_batch(ink, y, idx, DD.all_styles(), torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[2], b[2])
    assert np.array_equal(a[1], y[:64])
    assert len(set(a[2].tolist())) > 3  # several styles in one batch


def test_canvases_have_boxes_around_ink():
    ink, y = DD.load_ink()
    images, targets = DD.digit_canvases(ink, y, 12, torch.Generator().manual_seed(0))
    assert images.shape == (12, 3, DD.YOLO_SIZE, DD.YOLO_SIZE)
    for img, t in zip(images, targets):
        assert len(t) >= 1
        assert set(t[:, 0].astype(int)) <= set(range(10))
        assert np.all((t[:, 1:3] > 0) & (t[:, 1:3] < 1)) and np.all((t[:, 3:] > 0) & (t[:, 3:] <= 1))
        # the pixels inside each box differ from the paper colour (there is a digit there)
        s = DD.YOLO_SIZE
        for _, cx, cy, w, h in t:
            box = img[:, int((cy - h / 2) * s):int((cy + h / 2) * s), int((cx - w / 2) * s):int((cx + w / 2) * s)]
            assert (box - img[:, :1, :1]).abs().max() > 0.3


def test_config_scaling_and_cache_key():
    cfg = D.WorldConfig()
    small = cfg.scaled(0.1)
    assert small.unet_steps == 130 and small.vae_steps == 15 and small.seed == cfg.seed
    assert cfg.key() != small.key() and cfg.key() == D.WorldConfig().key()
    assert D.WorldConfig(seed=1).key() != cfg.key()
    assert D.default_cache_dir(cfg).name == f"digits-0-{cfg.key()}"


def test_build_world_refuses_unknown_part_and_foreign_folder(tmp_path):
    with pytest.raises(HarnessError, match="unknown part"):
        D.build_world(tmp_path / "w", parts=("sd", "nope"))
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / "world.json").write_text('{"config": {"seed": 9}}')
    with pytest.raises(HarnessError, match="another config"):
        D.build_world(tmp_path / "w2", D.WorldConfig(), parts=())


def test_build_world_does_not_retry_a_part_that_failed_for_this_config(tmp_path):
    """A short build's estimator that failed its check is recorded, not retrained by every demo run."""
    import json
    from dataclasses import asdict

    cfg = D.WorldConfig(seed=5)
    w = tmp_path / "w"
    w.mkdir()
    meta = {"config": asdict(cfg), "parts": {"estimator": {"failed": "does not beat the mean"}}}
    (w / "world.json").write_text(json.dumps(meta))
    D.build_world(w, cfg, parts=("estimator",))  # would need w/sd to train: it must not try
    assert not (w / "estimator").exists()
    assert json.loads((w / "world.json").read_text())["parts"]["estimator"]["failed"] == "does not beat the mean"


def test_sampling_scheduler_never_clips_latents():
    sched = DS.sampling_scheduler()
    assert sched.config.clip_sample is False
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000


def test_denoiser_training_is_bit_reproducible_across_a_thread_switch():
    """The world is deterministic for a seed: the same steps give the same bits, also when the UNet
    changes its thread count mid-run as the two-process build does."""
    n = torch.get_num_threads()
    # batch 64: at 16 the parallel accumulation of ``hidden[which]``'s backward happened to agree
    cfg = D.WorldConfig(unet_steps=8)
    latents = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = [DD.caption(i % 10) for i in range(256)]

    def run():
        torch.set_num_threads(1)
        try:
            unet, text = DS.train_denoiser(cfg, latents, captions, lambda step: 2 if step == 2 else None)
        finally:
            torch.set_num_threads(n)
        return torch.cat([p.detach().flatten() for m in (unet, text) for p in m.parameters()])

    assert torch.equal(run(), run())
