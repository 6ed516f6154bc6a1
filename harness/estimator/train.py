"""``harness estimator train``: fit on a built dataset, evaluate on held-out images, refuse a collapse.

What the seed's run got wrong, and what this does instead:
* one optimizer step per epoch (batch 8192 on ~8k samples) -> batch sized to the data (default 64)
  and a step count (default 1500) that is many epochs;
* a 10,000-step warm-up in a ~7,500-step run -> warm-up must be shorter than the run (error otherwise);
* a head with no nonlinearities -> see :mod:`harness.estimator.model`;
* no honest check -> the held-out split is by image *group* (every noise draw and timestep of an image,
  and every crop of one source if groups say so, stay on one side); MAE, Spearman, Pearson and
  accuracy within +-0.5 are reported per timestep next to the predict-the-train-mean baseline, and
  :class:`EstimatorCollapsed` (a HarnessError: non-zero exit) is raised when the estimator does not
  beat that baseline on the final image (timestep = the smallest one built).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.estimator.dataset import load_dataset
from harness.estimator.model import (
    HEADS,
    EstimatorConfig,
    build_net,
    head_loss,
    load_clip,
    save_estimator,
    targets_for,
)
from harness.io import atomic_write_json
from harness.provenance import record

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


class EstimatorCollapsed(HarnessError):
    """On held-out data the estimator is no better than predicting the mean rating."""


# --- metrics (pure functions) -------------------------------------------------------------------

def mae(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.abs(pred - target).mean())


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson r; 0.0 when either side is constant (no linear relation can be shown)."""
    if len(pred) < 2 or np.std(pred) < 1e-12 or np.std(target) < 1e-12:
        return 0.0
    return float(np.corrcoef(pred, target)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    # Average ranks for ties, as Spearman's rho needs.
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(pred)), _ranks(np.asarray(target)))


def within(pred: np.ndarray, target: np.ndarray, tol: float = 0.5) -> float:
    return float((np.abs(pred - target) <= tol).mean())


def scores(pred: np.ndarray, target: np.ndarray) -> dict:
    return {"mae": mae(pred, target), "spearman": spearman(pred, target), "pearson": pearson(pred, target),
            "acc_0.5": within(pred, target)}


def evaluate(pred: np.ndarray, target: np.ndarray, timesteps: np.ndarray, baseline: float) -> dict:
    """Per timestep: the estimator's scores and the predict-``baseline`` scores on the same samples."""
    out = {}
    for t in sorted(set(timesteps.tolist())):
        m = timesteps == t
        out[int(t)] = {"n": int(m.sum()), "model": scores(pred[m], target[m]),
                       "baseline": scores(np.full(int(m.sum()), baseline), target[m])}
    return out


def beats_baseline(per_t: dict, min_gain: float, min_spearman: float) -> tuple[bool, str]:
    """The collapse detector, on the final-image timestep (the smallest)."""
    t = min(per_t)
    m, b = per_t[t]["model"], per_t[t]["baseline"]
    ok = m["mae"] <= (1 - min_gain) * b["mae"] and m["spearman"] >= min_spearman
    why = (f"held-out at timestep {t}: MAE {m['mae']:.3f} vs mean-baseline {b['mae']:.3f} (needs <= "
           f"{(1 - min_gain) * b['mae']:.3f}), Spearman {m['spearman']:.3f} (needs >= {min_spearman})")
    return ok, why


def format_table(per_t: dict) -> str:
    lines = [f"{'t':>5} {'n':>5} | {'MAE':>6} {'base':>6} | {'Spear':>6} | {'Pears':>6} | {'acc.5':>6} {'base':>6}"]
    for t, r in per_t.items():
        m, b = r["model"], r["baseline"]
        lines.append(f"{t:>5} {r['n']:>5} | {m['mae']:6.3f} {b['mae']:6.3f} | {m['spearman']:6.3f} | "
                     f"{m['pearson']:6.3f} | {m['acc_0.5']:6.3f} {b['acc_0.5']:6.3f}")
    return "\n".join(lines)


# --- data plumbing ------------------------------------------------------------------------------

def split_groups(groups: list[str], holdout: float, seed: int) -> np.ndarray:
    """Boolean mask over images: True = held out. Whole groups go to one side."""
    if not 0 < holdout < 1:
        raise HarnessError(f"holdout: expected a fraction in (0, 1), got {holdout}")
    uniq = sorted(set(groups))
    if len(uniq) < 2:
        raise HarnessError(f"holdout: need at least 2 image groups to hold one out, got {len(uniq)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_hold = min(len(uniq) - 1, max(1, round(holdout * len(uniq))))
    held = {uniq[i] for i in order[:n_hold]}
    return np.array([g in held for g in groups])


def class_weights(ratings: torch.Tensor, levels: tuple) -> torch.Tensor:
    """Per-sample weights inversely proportional to the frequency of the sample's nearest level
    (mean 1), so a skewed rating distribution cannot be fitted by its mode or mean."""
    lv = torch.tensor(levels, dtype=torch.float32)
    idx = (ratings.unsqueeze(1) - lv.unsqueeze(0)).abs().argmin(dim=1)
    counts = torch.bincount(idx, minlength=len(levels)).float()
    w = (1.0 / counts.clamp(min=1))[idx]
    return w / w.mean()


def lr_lambda(warmup: int, steps: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@dataclasses.dataclass
class TrainResult:
    path: Path | None
    metrics: dict
    passed: bool


def train_estimator(dataset_dir: str | Path, out_dir: str | Path, *, clip: str | None, clip_pretrained=None,
                    head: str = "ordinal", finetune_clip: bool = True, conv_features: bool = True,
                    scale: tuple[float, float] = (0, 5), steps: int = 1500, batch_size: int = 64,
                    lr: float = 1e-3, clip_lr: float = 1e-4, warmup: int = 100, weight_decay: float = 1e-4,
                    holdout: float = 0.2, balance: str = "loss", seed: int = 0, device: str = "cpu",
                    min_gain: float = 0.1, min_spearman: float = 0.3, hidden: int = 128) -> TrainResult:
    """Train, evaluate per timestep on held-out groups, save ``out_dir/estimator.safetensors`` (+ json)
    and ``out_dir/metrics.json``. Raises :class:`EstimatorCollapsed` (after writing metrics.json,
    without saving the model) if the held-out final-image scores do not beat the mean baseline."""
    if head not in HEADS:
        raise HarnessError(f"head: unknown {head!r}; known: {', '.join(HEADS)}")
    if balance not in ("loss", "sampler", "none"):
        raise HarnessError(f"balance: expected 'loss', 'sampler' or 'none', got {balance!r}")
    if steps < 1 or not 0 <= warmup < steps:
        raise HarnessError(f"warmup: expected 0 <= warmup < steps, got warmup={warmup}, steps={steps}")
    if clip is None and not conv_features:
        raise HarnessError("clip: None needs conv_features=True (the estimator needs some image features)")
    tensors, meta = load_dataset(dataset_dir)
    torch.manual_seed(seed)
    cfg, net = _make_net(meta, clip, clip_pretrained, head, finetune_clip, conv_features, scale, hidden)
    ratings = tensors["rating"]
    if ratings.min() < scale[0] or ratings.max() > scale[1]:
        raise HarnessError(f"scale: dataset ratings span {ratings.min():.2f}..{ratings.max():.2f}, outside "
                           f"the declared scale {scale[0]}..{scale[1]}")
    held_img = split_groups([i["group"] for i in meta["images"]], holdout, seed)
    held = torch.from_numpy(held_img)[tensors["image_index"]]
    tr = (~held).nonzero().squeeze(1)
    te = held.nonzero().squeeze(1)
    bs = min(batch_size, len(tr))
    log.info("estimator: %d train / %d held-out samples (%d / %d images), batch %d, %d steps (%.1f epochs)",
             len(tr), len(te), int((~held_img).sum()), int(held_img.sum()), bs, steps, steps * bs / len(tr))
    net = net.to(device)
    _fit(net, cfg, tensors, tr, steps, bs, lr, clip_lr, warmup, weight_decay, balance, seed, device)
    pred = predict_samples(net, tensors["previews"][te], tensors["timestep"][te], device)
    train_mean = float(ratings[tr].mean())
    per_t = evaluate(pred, ratings[te].numpy(), tensors["timestep"][te].numpy(), train_mean)
    ok, why = beats_baseline(per_t, min_gain, min_spearman)
    metrics = {"per_timestep": per_t, "baseline_value": train_mean, "passed": ok, "check": why,
               "n_train": len(tr), "n_heldout": len(te), "config": cfg.to_dict(),
               "training": {"steps": steps, "batch_size": bs, "lr": lr, "clip_lr": clip_lr, "warmup": warmup,
                            "balance": balance, "seed": seed, "holdout": holdout},
               "provenance": record()}
    out = Path(out_dir)
    atomic_write_json(out / METRICS_FILE, metrics)
    log.info("held-out per timestep (estimator vs predict-the-mean):\n%s", format_table(per_t))
    if not ok:
        raise EstimatorCollapsed(f"estimator does not beat the predict-the-mean baseline ({why}); "
                                 f"model not saved, metrics in {out / METRICS_FILE}")
    return TrainResult(save_estimator(net.cpu(), out), metrics, ok)


def _make_net(meta, clip, clip_pretrained, head, finetune_clip, conv_features, scale, hidden):
    lo, hi = float(scale[0]), float(scale[1])
    levels = tuple(float(v) for v in np.arange(lo, hi + 1e-9, 1.0)) if hi - lo <= 20 else (lo, hi)
    if head != "regression" and len(levels) < 2:
        raise HarnessError(f"scale: {scale} gives fewer than 2 levels for the {head} head")
    clip_model, clip_cfg, size, mean, std = (None, None, 224, (0.5,) * 3, (0.5,) * 3)
    if clip:
        clip_model, clip_cfg, size, mean, std = load_clip(clip, clip_pretrained)
    cfg = EstimatorConfig(
        clip=clip or "", clip_pretrained=clip_pretrained, clip_model_cfg=clip_cfg, clip_image_size=size,
        clip_mean=tuple(mean), clip_std=tuple(std), finetune_clip=finetune_clip, conv_features=conv_features,
        head=head, scale=(lo, hi), levels=levels, hidden=hidden, preview=meta["preview"],
        preview_size=meta["preview_size"], image_size=meta["image_size"], timesteps=tuple(meta["timesteps"]),
        num_train_timesteps=meta["schedule"]["num_train_timesteps"], vae=meta["vae_identity"],
    )
    return cfg, build_net(cfg, clip_model)


def _fit(net, cfg, tensors, tr, steps, bs, lr, clip_lr, warmup, weight_decay, balance, seed, device):
    from harness.progress import Progress

    ratings = tensors["rating"][tr]
    weights = class_weights(ratings, cfg.levels) if balance != "none" else torch.ones(len(tr))
    targets = targets_for(cfg, ratings)
    clip_params = [p for n, p in net.named_parameters() if n.startswith("visual.") and p.requires_grad]
    rest = [p for n, p in net.named_parameters() if not n.startswith("visual.")]
    groups = [{"params": rest, "lr": lr}] + ([{"params": clip_params, "lr": clip_lr}] if clip_params else [])
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    g = torch.Generator().manual_seed(seed)
    net.train()
    t0, running = time.time(), None
    for step in Progress(range(steps), desc="train estimator", leave=False):
        if balance == "sampler":
            idx = torch.multinomial(weights, bs, replacement=True, generator=g)
        else:
            idx = torch.randint(0, len(tr), (bs,), generator=g)
        j = tr[idx]
        x = tensors["previews"][j].float().div(255)
        flip = torch.rand(bs, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).to(device)
        out = net(x, tensors["timestep"][j].to(device))
        w = weights[idx] if balance == "loss" else torch.ones(bs)
        loss = head_loss(cfg, out, targets[idx].to(device), w.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % max(1, steps // 5) == 0:
            log.info("step %d/%d loss %.4f (%.1fs)", step + 1, steps, running, time.time() - t0)
    net.eval()


@torch.no_grad()
def predict_samples(net, previews: torch.Tensor, timesteps: torch.Tensor, device: str = "cpu",
                    batch_size: int = 256) -> np.ndarray:
    net.eval()
    out = []
    for i in range(0, len(previews), batch_size):
        x = previews[i:i + batch_size].float().div(255).to(device)
        out.append(net.predict(net(x, timesteps[i:i + batch_size].to(device))).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)
