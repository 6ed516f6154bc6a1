"""The training loop on accelerate: ``train(recipe) -> Path`` (the run's ``final/`` folder).

Run layout (``recipe.output_dir``)::

    recipe.yaml            the fully resolved recipe     provenance.json   versions, hardware, command
    metrics.jsonl          one record per logged step    logs/             TensorBoard (accelerate tracker)
    checkpoints/step-N/    resumable state (last K)      samples/step-N/   fixed-seed PNGs (prompt in metadata)
    stages/NAME/           diffusers export at the end of each stage of a multi-stage recipe
    final/  final.safetensors   diffusers folder (fp32) and single file (checkpoint.single_file_dtype)
    lora/                  LoRA runs: the adapter alone, diffusers' file and a kohya one (A1111, ComfyUI)
    train_summary.json     steps, why it stopped, best validation step

Every random draw of a step (latent sample, noise, timesteps) comes from a generator seeded by
(seed, step, micro-batch, rank), and data order from (seed, epoch), so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import to_dict
from harness.errors import ConfigError
from harness.io import append_jsonl, atomic_write_json, atomic_write_text
from harness.lock import run_lock
from harness.provenance import record
from harness.train import checkpoint as ckpt
from harness.train import losses
from harness.train.accel import (
    build_accelerator,
    is_deepspeed,
    is_sharded,
    no_zero3_init,
    reshard,
    shard_rank,
)
from harness.train.cache import TextCache, sample_latents
from harness.train.data import (
    Data,
    build_caches,
    build_data,
    caption_encoder,
    encode_batch,
    epoch_loader,
    step_generator,
)
from harness.train.ema import EMA
from harness.train.finish import export_models, finish_run, keeps_best
from harness.train.metrics_log import MetricsLog, StepTimer, flat_config, memory_stats
from harness.train.models import Models, build_models, fingerprint, named_parameters, whole_models
from harness.train.optim import (
    TrainingDiverged,
    build_lr_scheduler,
    build_optimizer,
    check_optimizer,
    loss_scale_stats,
    stage_totals,
    step_applied,
    what_to_do,
)
from harness.train.recipe import Recipe, StageCfg, recipe_yaml
from harness.train.timesteps import check_range, sample_timesteps
from harness.train.validator import Scorer, Validator, check_scorers

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the run

def train(recipe: Recipe, *, resume: str | None = None, scorers: dict[str, Scorer] | None = None) -> Path:
    """Fine-tune per ``recipe``; ``resume`` is ``"latest"`` or a checkpoint folder. ``scorers`` maps
    names used in ``validation.eval_metrics`` to ``(images, prompts) -> float`` callables. Returns
    ``output_dir/final`` (a diffusers folder)."""
    from accelerate.utils import set_seed

    run_dir = Path(recipe.output_dir)
    scorers = dict(scorers or {})
    check_optimizer(recipe.train.optimizer)
    check_scorers(list(recipe.validation.eval_metrics), scorers, dict(recipe.validation.scorer_models))
    ckpt.check_output_dir(run_dir, resume, recipe.data.root)
    acc = build_accelerator(recipe, run_dir)
    data = build_data(recipe, acc.num_processes, acc.process_index)
    set_seed(recipe.train.seed)
    # one writer per run folder: the main process holds the lock, the other ranks write under it
    with run_lock(run_dir, "harness train") if acc.is_main_process else contextlib.nullcontext(), \
            no_zero3_init(acc):
        return _train(recipe, acc, data, run_dir, resume, scorers)


def _train(recipe: Recipe, acc, data: Data, run_dir: Path, resume, scorers) -> Path:
    models = build_models(recipe, acc.device)
    stages = recipe.resolved_stages()
    for s in stages:
        try:
            check_range(s.t_min, s.t_max or models.num_train_timesteps, models.num_train_timesteps)
        except ValueError as e:
            raise ConfigError(f"stage {s.name!r}: {e}") from None
    resume_path = ckpt.find_resume(run_dir, resume) if resume else None
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ckpt.RUN_MARKER).touch()
        ckpt.clean_stale(run_dir)
        atomic_write_text(run_dir / "recipe.yaml", recipe_yaml(recipe))
        atomic_write_json(run_dir / "provenance.json", record(seed=recipe.train.seed, resumed_from=str(resume_path)))
    acc.wait_for_everyone()
    return _run(recipe, acc, models, data, stages, run_dir, resume_path, scorers)


def _run(recipe, acc, models: Models, data: Data, stages, run_dir: Path, resume_path, scorers) -> Path:
    run = _prepare(recipe, acc, models, data, stages, run_dir, resume_path, scorers)
    if run.state["step"] == 0 and recipe.validation.at_start:
        run.validate()
    while run.state["stage"] < len(stages) and run.reason == "completed":
        run.train_stage()
    run.bar.close()
    return finish_run(recipe, acc, models, run.raw_unet, run.raw_te, run.ema, run_dir, run.state, run.reason,
                      run.validator)


@dataclass
class _Run:
    """A run in progress: the objects accelerate prepared, the resumable ``state`` (written into every
    checkpoint) and the loop's bookkeeping. Its methods are the loop: stage, epoch, step."""

    recipe: Recipe
    acc: object
    models: Models
    data: Data
    stages: list[StageCfg]
    totals: list[int]  # optimizer steps of each stage
    run_dir: Path
    resume_path: Path | None
    sharded: bool
    rank: int | None  # the shard rank of this process's EMA / best-weights files (sharded runs only)
    unet: torch.nn.Module  # as prepared by accelerate; raw_unet / raw_te are the unwrapped models
    raw_unet: torch.nn.Module
    raw_te: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    validator: Validator | None
    metrics: MetricsLog
    state: dict
    train_ds: torch.utils.data.Dataset
    text_cache: TextCache | None
    timer: StepTimer
    window: list  # start, steps, summed loss since the last log line
    bar: object
    lr_scheduler: object = None
    last_ckpt: Path | None = None
    reason: str = "completed"  # why training stopped; anything else ends the loop

    def named(self) -> list:
        return named_parameters(self.raw_unet, self.raw_te)

    def train_stage(self) -> None:
        """The current stage: its own LR schedule (the checkpoint's when resuming inside it), its epochs
        until its share of the steps is done, then the stage's end."""
        state, si = self.state, self.state["stage"]
        stage, total = self.stages[si], self.totals[si]
        self.lr_scheduler = build_lr_scheduler(self.optimizer, stage, total, self.recipe.train.lr_scheduler,
                                               self.recipe.train.text_encoder_lr)
        if self.resume_path is not None and state["stage_step"] > 0:
            ckpt.load_lr_scheduler(self.resume_path, self.lr_scheduler)
        while state["stage_step"] < total and self.reason == "completed":
            self.train_epoch(stage, total)
        if self.reason == "completed":
            self.end_stage()

    def train_epoch(self, stage: StageCfg, total: int) -> None:
        """The rest of the current epoch, or of the stage when it ends first."""
        recipe, data, state = self.recipe, self.data, self.state
        it = iter(epoch_loader(data, self.train_ds, state["epoch"], state["step_in_epoch"], recipe.train.grad_accum,
                               recipe.data.num_workers))
        while state["step_in_epoch"] < data.steps_per_epoch and state["stage_step"] < total:
            self.step(it, stage, total)
            if self.reason != "completed":
                break
        if state["step_in_epoch"] >= data.steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0

    def step(self, it, stage: StageCfg, total: int) -> None:
        """One optimizer step, then the schedule and EMA (when the step was applied), the counters, the
        log line, a due validation and a due checkpoint."""
        recipe, acc, state = self.recipe, self.acc, self.state
        loss = _optimizer_step(recipe, acc, self.models, self.unet, self.optimizer, it, self.text_cache, stage, state,
                               self.last_ckpt, recipe.lora.text_encoder, self.timer)
        lr_now = self.lr_scheduler.get_last_lr()[0]
        if step_applied(acc, self.optimizer, state, self.last_ckpt, recipe):
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.named())
        state["step"] += 1
        state["stage_step"] += 1
        state["step_in_epoch"] += 1
        self.bar.update(1)
        _log_step(recipe, acc, self.metrics, state, self.window, loss, lr_now, stage, self.timer)
        if recipe.validation.every_steps and state["step"] % recipe.validation.every_steps == 0 and self.validate():
            self.reason = "early_stopping"
        due = recipe.checkpoint.every_steps and state["step"] % recipe.checkpoint.every_steps == 0
        if (due and state["stage_step"] < total) or self.reason != "completed":
            self.save()  # the last step of a stage is saved by end_stage

    def end_stage(self) -> None:
        """Validate (unless this step just did), checkpoint at the boundary, and export a multi-stage
        recipe's stage to ``stages/NAME/``."""
        recipe, acc, state = self.recipe, self.acc, self.state
        si = state["stage"]
        if state["step_in_epoch"]:  # a stage cut short by max_steps: the next one starts a fresh epoch
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        last_stage = si == len(self.stages) - 1
        if not (recipe.validation.every_steps and state["step"] % recipe.validation.every_steps == 0):
            self.validate()
        state["stage"] += 1
        state["stage_step"] = 0
        self.save()  # at the stage boundary, so a resume starts the next stage (overwrites a same-step save)
        if len(self.stages) > 1 and not last_stage:
            unet, te = whole_models(recipe, acc, self.models, self.raw_unet, self.raw_te)
            if acc.is_main_process:
                export_models(recipe, self.models, unet, te, self.run_dir / "stages" / self.stages[si].name,
                              single_file=False, steps=state["step"])
        acc.wait_for_everyone()

    def save(self) -> None:
        if self.validator is not None:
            self.state["early_stopping"] = self.validator.stopper.state()
        self.last_ckpt = ckpt.save_checkpoint(self.acc, self.run_dir, dict(self.state), self.lr_scheduler, self.ema,
                                              self.recipe.checkpoint.keep_last, self.rank)

    def validate(self) -> bool:
        """Validate now, log the results and keep the weights when they are the best so far; whether early
        stopping says stop (the main process decides, every process gets its answer)."""
        from accelerate.utils import broadcast_object_list

        acc, step, validator = self.acc, self.state["step"], self.validator
        stop_now, best_now = False, False
        if validator is not None:
            results = validator.run(step, self.raw_unet, self.raw_te)
            reshard(acc, self.raw_unet, self.raw_te)
            if acc.is_main_process:
                if results:
                    self.metrics.write(step, results)
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()
                                                            if "/t=" not in k))
                stop_now = validator.should_stop(step, results)
                best_now = keeps_best(self.recipe) and validator.stopper.best_step == step
        stop_now, best_now = broadcast_object_list([stop_now, best_now])
        if best_now and (acc.is_main_process or self.sharded):
            ckpt.save_best(self.run_dir, step, self.named(), self.ema, self.rank)
        return stop_now


def _prepare(recipe, acc, models: Models, data: Data, stages, run_dir: Path, resume_path, scorers) -> _Run:
    """Everything the loop needs: the caches, the validator, the optimizer and prepared models, EMA, the
    state to start from (the checkpoint's when resuming), the metrics log and trackers."""
    latent_cache, text_cache, train_ds = build_caches(recipe, acc, models, data)
    sharded, rank = is_sharded(acc), shard_rank(acc)
    if is_deepspeed(acc) and models.weight_dtype != torch.float32:
        models.input_dtype = models.weight_dtype
    validator = Validator(recipe, models, data, latent_cache, caption_encoder(models, text_cache), run_dir, scorers,
                          main=acc.is_main_process) if acc.is_main_process or sharded else None
    unet, optimizer, raw_unet, raw_te = _prepare_models(recipe, acc, models)
    ema = EMA(named_parameters(raw_unet, raw_te), recipe.ema.decay,
              recipe.ema.update_after_step) if recipe.ema.enabled else None
    state = _start_state(recipe, acc, models, resume_path, ema, sharded, rank)
    metrics = MetricsLog(acc, run_dir)
    metrics.truncate_after(state["step"])
    if validator is not None:
        validator.stopper.load(state.get("early_stopping", {}))
    # W&B writes its run folder (and, offline, its whole log) into the run, not into the current directory.
    acc.init_trackers(recipe.logging.project, config=flat_config(to_dict(recipe)),
                      init_kwargs={"wandb": {"dir": str(run_dir / "logs"), "name": run_dir.name}})
    totals = stage_totals(stages, data.steps_per_epoch, recipe.train.max_steps)
    from harness.progress import Progress

    timer = StepTimer(recipe.logging.timing, acc.device)
    window = [time.perf_counter(), 0, 0.0]
    bar = Progress(total=sum(totals), initial=state["step"], disable=not acc.is_main_process, desc="training")
    return _Run(recipe=recipe, acc=acc, models=models, data=data, stages=stages, totals=totals, run_dir=run_dir,
                resume_path=resume_path, sharded=sharded, rank=rank, unet=unet, raw_unet=raw_unet, raw_te=raw_te,
                optimizer=optimizer, ema=ema, validator=validator, metrics=metrics, state=state, train_ds=train_ds,
                text_cache=text_cache, timer=timer, window=window, bar=bar, last_ckpt=resume_path)


def _prepare_models(recipe: Recipe, acc, models: Models):
    """The optimizer over the trainable parameters, prepared by accelerate with the UNet (and the text
    encoder when it trains); returns (prepared unet, optimizer, unwrapped unet, unwrapped text encoder)."""
    optimizer = build_optimizer(recipe, [p for p in models.unet.parameters() if p.requires_grad],
                                [p for p in models.text_encoder.parameters() if p.requires_grad])
    if recipe.lora.text_encoder:
        unet, text_encoder, optimizer = acc.prepare(models.unet, models.text_encoder, optimizer)
    else:
        unet, optimizer = acc.prepare(models.unet, optimizer)
        text_encoder = models.text_encoder
    return unet, optimizer, acc.unwrap_model(unet), acc.unwrap_model(text_encoder)


def _start_state(recipe: Recipe, acc, models: Models, resume_path, ema, sharded: bool, rank) -> dict:
    """The trainer state at the first step: a fresh one, or the checkpoint's when resuming (loading it
    also restores the models, optimizer, RNG and EMA)."""
    fp = fingerprint(models, recipe, acc.num_processes if sharded else None, "deepspeed" if is_deepspeed(acc) else None)
    state = {"step": 0, "stage": 0, "stage_step": 0, "epoch": 0, "step_in_epoch": 0, "early_stopping": {},
             "fingerprint": fp}
    if resume_path is not None:
        state = ckpt.load_checkpoint(acc, resume_path, fp, ema, rank, recipe.checkpoint.allow_pickle)
    return state


# ---------------------------------------------------------------- one step

def diffusion_loss(unet, models: Models, dist: torch.Tensor, hidden: torch.Tensor, stage: StageCfg,
                   recipe: Recipe, gen: torch.Generator, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    t_cfg = recipe.train
    device = next(unet.parameters()).device
    x0 = sample_latents(dist.cpu(), models.scaling_factor, gen)
    noise = losses.offset_noise(tuple(x0.shape), t_cfg.noise_offset, gen)
    t = sample_timesteps(len(x0), stage.t_min, stage.t_max or models.num_train_timesteps, gen)
    noisy = losses.add_noise(x0, noise, t, models.alphas_cumprod)
    tgt = losses.target(models.prediction_type, x0, noise, t, models.alphas_cumprod)
    dt = models.input_dtype
    pred = unet(noisy.to(device, dt), t.to(device), hidden.to(device, dt), return_dict=False)[0]
    weights = None if sample_weights is None else sample_weights.to(device)  # prior preservation
    if t_cfg.min_snr_gamma:
        snr_w = losses.min_snr_weights(losses.snr(t, models.alphas_cumprod), t_cfg.min_snr_gamma,
                                       models.prediction_type).to(device)
        weights = snr_w if weights is None else weights * snr_w
    return losses.weighted_mse(pred, tgt.to(device), weights)


def _optimizer_step(recipe, acc, models, unet, optimizer, it, text_cache, stage, state, last_good, train_text,
                    timer: StepTimer) -> float:
    k = recipe.train.grad_accum
    ds = is_deepspeed(acc)
    total = 0.0
    for micro in range(k):
        with timer("data"):
            batch = next(it)
        if recipe.logging.data_order:
            append_jsonl(Path(recipe.output_dir) / "data_order" / f"rank-{acc.process_index}.jsonl",
                         {"step": state["step"] + 1, "micro": micro, "keys": batch["key"]})
        gen = step_generator(recipe.train.seed, state["step"], micro, acc.process_index)
        if ds:  # the engine steps the optimizer inside backward, at the boundary it is told of
            acc.sync_gradients = micro == k - 1
        with contextlib.nullcontext() if micro == k - 1 or ds else acc.no_sync(unet):
            with timer("encode"):
                dist, hidden = encode_batch(batch, models, text_cache, train_text)
            with timer("unet"):
                loss = diffusion_loss(unet, models, dist, hidden.to(acc.device), stage, recipe, gen,
                                      batch.get("loss_weight"))
                _check_finite(acc, loss, state["step"], last_good, recipe)
                acc.backward(loss if ds else loss / k)  # DeepSpeed divides by its accumulation steps
        total += loss.detach().item() / k
    with timer("optimizer"):
        if recipe.train.max_grad_norm and not ds:  # DeepSpeed clips by its config (gradient_clipping)
            acc.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timer.steps += 1
    return total


def _check_finite(acc, loss: torch.Tensor, step: int, last_good, recipe: Recipe) -> None:
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=acc.device)
    if acc.reduce(bad, reduction="sum").item() > 0:
        raise TrainingDiverged(f"step {step + 1}: training loss is {loss.item()} (not finite); stopped before "
                               f"applying it, {what_to_do(last_good, recipe)}")


def _log_step(recipe, acc, metrics: MetricsLog, state, window: list, loss: float, lr: float, stage,
              timer: StepTimer) -> None:
    window[1] += 1
    window[2] += loss
    if state["step"] % recipe.logging.every_steps:
        return
    now = time.perf_counter()
    mean = acc.reduce(torch.tensor([window[2] / window[1]], device=acc.device), reduction="mean").item()
    images = window[1] * recipe.train.batch_size * recipe.train.grad_accum * acc.num_processes
    values = {"loss": mean, "lr": lr, "epoch": state["epoch"], "stage": stage.name,
              "images_per_s": images / max(now - window[0], 1e-9), **loss_scale_stats(acc, state),
              **memory_stats(acc.device), **timer.pop()}
    metrics.write(state["step"], values)
    window[:] = [time.perf_counter(), 0, 0.0]


def train_from_file(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, resume: str | None = None,
                    scorers: dict[str, Scorer] | None = None) -> Path:
    """:func:`train` on a recipe file with ``key=value`` overrides."""
    from harness.train.recipe import load_recipe

    return train(load_recipe(path, overrides), resume=resume, scorers=scorers)
