"""The optimizer and its schedule: AdamW (or bitsandbytes' 8-bit AdamW), one LR schedule per stage,
each stage's share of the optimizer steps, and the accounting of fp16 steps the loss scaler skipped."""

from __future__ import annotations

import torch

from harness.errors import ConfigError, HarnessError
from harness.train.recipe import Recipe, StageCfg


class TrainingDiverged(HarnessError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was written."""


def check_optimizer(name: str) -> None:
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("key 'train.optimizer' = 'adamw8bit': needs bitsandbytes, which is not installed "
                              "(pip install 'harness[adam8bit]'), or set train.optimizer=adamw") from None


def build_optimizer(recipe: Recipe, params: list[torch.nn.Parameter],
                    text_encoder_params: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """AdamW over the UNet's trainable parameters and, in a group of their own (its own learning rate,
    ``train.text_encoder_lr``), the text encoder's."""
    t = recipe.train
    kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    groups = [{"params": params, "name": "unet"}]
    if text_encoder_params:
        groups.append({"params": text_encoder_params, "name": "text_encoder"})
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def build_lr_scheduler(optimizer, stage: StageCfg, total_steps: int, name: str, text_encoder_lr: float | None = None):
    """The stage's schedule; every group starts from the stage's learning rate, the text encoder's from
    ``text_encoder_lr`` when the recipe sets one (the same in every stage)."""
    from diffusers.optimization import get_scheduler

    for g in optimizer.param_groups:  # each stage starts from its own learning rate
        lr = text_encoder_lr if g.get("name") == "text_encoder" and text_encoder_lr is not None else stage.lr
        g["lr"] = g["initial_lr"] = lr
    return get_scheduler(name, optimizer, num_warmup_steps=stage.warmup_steps, num_training_steps=total_steps)


def stage_steps(stage: StageCfg, steps_per_epoch: int) -> int:
    total = stage.epochs * steps_per_epoch
    return min(total, stage.max_steps) if stage.max_steps else total


def stage_totals(stages: list[StageCfg], steps_per_epoch: int, max_steps: int | None) -> list[int]:
    """Optimizer steps of each stage; ``train.max_steps`` also caps the sum over all stages."""
    out, left = [], max_steps if max_steps is not None else float("inf")
    for s in stages:
        n = int(min(stage_steps(s, steps_per_epoch), left))
        out.append(n)
        left -= n
    return out


# ---------------------------------------------------------------- fp16 steps and divergence

def what_to_do(last_good, recipe: Recipe) -> str:
    """The end of a divergence message: where the last good weights are and how to go on."""
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
    return (f"{where}; lower train.lr (now {recipe.train.lr}) or use mixed_precision=no/bf16 and resume with "
            f"--resume latest")


# Each skipped fp16 step halves the loss scale, so this many in a row is a fall of 2**20 from wherever it
# stood: gradients that overflow at every one of those scales are not finite at any, the run has diverged.
MAX_SKIPPED_IN_ROW = 20


def step_applied(acc, optimizer, state: dict, last_good, recipe: Recipe) -> bool:
    """Whether the optimizer step just taken changed the weights. fp16 loss scaling (accelerate's
    GradScaler, or DeepSpeed's) skips a step whose gradients overflowed and lowers the scale; the LR
    schedule and EMA then stay where they are, as accelerate's own prepared scheduler does. The skips
    are counted in the trainer state (so a resume continues the count) and logged."""
    if not getattr(optimizer, "step_was_skipped", False):
        state["skipped_in_row"] = 0
        return True
    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
    state["skipped_in_row"] = state.get("skipped_in_row", 0) + 1
    if state["skipped_in_row"] >= MAX_SKIPPED_IN_ROW:
        scale = f" (loss scale now {acc.scaler.get_scale():g})" if acc.scaler is not None else ""
        raise TrainingDiverged(f"step {state['step'] + 1}: the last {state['skipped_in_row']} optimizer steps were "
                               f"all skipped because the fp16 gradients overflowed{scale}; the weights are those "
                               f"of step {state['step'] + 1 - state['skipped_in_row']}; stopped, "
                               f"{what_to_do(last_good, recipe)}")
    return False


def loss_scale_stats(acc, state: dict) -> dict:
    """The fp16 loss scale and how many steps it skipped so far: a scale that keeps falling is a run
    heading for overflow."""
    if acc.scaler is None and not state.get("skipped_steps"):
        return {}
    out = {"skipped_steps": state.get("skipped_steps", 0)}
    if acc.scaler is not None:
        out["loss_scale"] = float(acc.scaler.get_scale())
    return out
