"""The math of the training objective, timestep ranges, EMA and early stopping, as pure functions."""

from __future__ import annotations

import pytest
import torch

from harness.train import losses
from harness.train.ema import EMA, ema_decay
from harness.train.timesteps import check_range, evenly_spaced, sample_timesteps
from harness.train.validator import EarlyStopping, drift_scorer


@pytest.fixture(scope="module")
def alphas():
    from diffusers import DDPMScheduler

    from harness.models.tiny import SD15_SCHEDULER

    cfg = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("skip_prk_steps", "set_alpha_to_one", "steps_offset")}
    return DDPMScheduler(**cfg)


def test_add_noise_and_velocity_match_diffusers(alphas):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ours = losses.add_noise(x0, noise, t, alphas.alphas_cumprod)
    torch.testing.assert_close(ours, alphas.add_noise(x0, noise, t))
    torch.testing.assert_close(losses.velocity(x0, noise, t, alphas.alphas_cumprod), alphas.get_velocity(x0, noise, t))


def test_target_by_prediction_type(alphas):
    x0, noise, t = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.tensor([10, 900])
    assert torch.equal(losses.target("epsilon", x0, noise, t, alphas.alphas_cumprod), noise)
    v = losses.target("v_prediction", x0, noise, t, alphas.alphas_cumprod)
    # with zero noise, v = -sqrt(1 - abar) x0: more negative at the noisy end
    assert v[1].mean() < v[0].mean() < 0
    with pytest.raises(ValueError, match="prediction_type = 'sample'.*epsilon, v_prediction"):
        losses.target("sample", x0, noise, t, alphas.alphas_cumprod)


def test_min_snr_weights(alphas):
    t = torch.tensor([1, 100, 500, 999])
    s = losses.snr(t, alphas.alphas_cumprod)
    assert torch.all(s[:-1] > s[1:])  # SNR falls as noise grows
    w = losses.min_snr_weights(s, 5.0, "epsilon")
    # low-noise steps (SNR > gamma) are down-weighted to gamma/SNR; noisy ones keep weight 1
    torch.testing.assert_close(w[0], 5.0 / s[0])
    assert w[-1] == 1.0
    wv = losses.min_snr_weights(s, 5.0, "v_prediction")
    torch.testing.assert_close(wv, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    with pytest.raises(ValueError, match="gamma = 0"):
        losses.min_snr_weights(s, 0, "epsilon")


def test_offset_noise_shifts_channel_means():
    g = torch.Generator().manual_seed(0)
    plain = losses.offset_noise((64, 4, 16, 16), 0.0, torch.Generator().manual_seed(0))
    off = losses.offset_noise((64, 4, 16, 16), 0.5, g)
    # a per-(sample, channel) constant makes the spatial means spread ~0.5 instead of ~1/16
    assert plain.mean(dim=(2, 3)).std() < 0.1 < off.mean(dim=(2, 3)).std()


def test_weighted_mse():
    pred, tgt = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert losses.weighted_mse(pred, tgt).item() == 1.0
    assert losses.weighted_mse(pred, tgt, torch.tensor([1.0, 0.0])).item() == 0.5


def test_timesteps_stay_in_range():
    t = sample_timesteps(10_000, 750, 1000, torch.Generator().manual_seed(0))
    assert t.min() >= 750 and t.max() <= 999 and t.max() >= 990
    assert evenly_spaced(750, 1000, 5) == [775, 825, 875, 925, 975]
    check_range(0, 1000, 1000)
    with pytest.raises(ValueError, match=r"\[500, 1200\).*1000"):
        check_range(500, 1200, 1000)


def test_ema_tracks_weights_and_round_trips(tmp_path):
    assert ema_decay(1, 0.9) == 0.0 and ema_decay(1000, 0.9) == 0.9
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.5)
    for _ in range(50):
        with torch.no_grad():
            p.add_(1.0)
        ema.update([("w", p)])
    assert 45 < ema.shadow["w"][0] < 50  # lags the weight (50) by about decay/(1-decay)
    ema.save(tmp_path / "ema.safetensors")
    other = EMA([("w", torch.nn.Parameter(torch.zeros(3)))], decay=0.5)
    other.load(tmp_path / "ema.safetensors")
    assert other.step == 50 and torch.equal(other.shadow["w"], ema.shadow["w"])
    q = torch.nn.Parameter(torch.zeros(3))
    other.copy_to([("w", q)])
    assert torch.equal(q.data, ema.shadow["w"])


def test_early_stopping_patience():
    es = EarlyStopping(patience=2, mode="min", min_delta=0.01)
    assert not es.update(1, 1.0)
    assert not es.update(2, 0.5)
    assert not es.update(3, 0.495)  # not better by min_delta
    assert es.update(4, 0.6)
    assert es.best_step == 2
    es2 = EarlyStopping(patience=None)
    assert not any(es2.update(i, float(i)) for i in range(10))


def test_drift_scorer():
    from PIL import Image

    black, white = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 255, 255))
    score = drift_scorer([black, black])
    assert score([black, black], ["a", "b"]) == 0.0
    assert score([white, black], ["a", "b"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="expected 2 images"):
        score([black], ["a"])
