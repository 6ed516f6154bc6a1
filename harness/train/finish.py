"""The end of a run: the weights final/ gets (the best validation's when early stopping keeps them,
EMA's when the recipe says so), the diffusers export, and ``train_summary.json``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from harness.config import to_dict
from harness.io import append_jsonl, atomic_write_json
from harness.provenance import record
from harness.train import checkpoint as ckpt
from harness.train.accel import is_sharded, shard_rank
from harness.train.cache import module_hash
from harness.train.models import Models, named_parameters, whole_models
from harness.train.pipeline import export_pipeline, merge_lora, save_lora
from harness.train.recipe import Recipe

log = logging.getLogger(__name__)


def keeps_best(recipe: Recipe) -> bool:
    """Whether the run keeps the best validation's weights for final/ (early stopping on, restore_best)."""
    return recipe.validation.restore_best and recipe.validation.early_stopping_patience is not None


def _restore_best(recipe, run_dir: Path, state, validator, raw_unet, raw_te, ema, rank) -> int:
    """The step whose weights final/ gets: the best validation's when early stopping keeps them. The
    main process decides; under FSDP2 every process loads its own shards."""
    best = validator.stopper.best_step if validator is not None and validator.main else None
    if not keeps_best(recipe) or best is None or best == state["step"]:
        return state["step"]
    on_disk = ckpt.best_step(run_dir, rank)
    if on_disk != best:  # e.g. a resume discarded the steps that wrote it
        log.warning("%s holds step %s, not the best validation's step %d: final/ gets the last step's weights",
                    run_dir / ckpt.shard_file(ckpt.BEST, rank), on_disk, best)
        return state["step"]
    return best


def _load_best(recipe, run_dir, state, best: int, validator, raw_unet, raw_te, ema, rank) -> None:
    if best == state["step"]:
        return
    ckpt.load_best(run_dir, named_parameters(raw_unet, raw_te), ema, rank)
    if validator is None or not validator.main:
        return
    log.info("final/ gets the weights of step %d (best %s %.4g), not of step %d where training stopped; "
             "those are in %s", best, recipe.validation.early_stopping_metric, validator.stopper.best,
             state["step"], run_dir / ckpt.CHECKPOINTS)


def finish_run(recipe, acc, models, raw_unet, raw_te, ema, run_dir: Path, state, reason: str, validator) -> Path:
    """Export final/ and write train_summary.json (called on every process); returns final/."""
    from accelerate.utils import broadcast_object_list

    acc.wait_for_everyone()
    sharded, rank = is_sharded(acc), shard_rank(acc)
    if recipe.logging.data_order and not sharded:  # what each rank holds: ranks must agree with final/
        append_jsonl(run_dir / "data_order" / f"rank-{acc.process_index}.jsonl",
                     {"step": state["step"], "unet_sha256": module_hash(raw_unet)})
    final = run_dir / "final"
    final_step = state["step"]
    if acc.is_main_process:
        final_step = _restore_best(recipe, run_dir, state, validator, raw_unet, raw_te, ema, rank)
    if sharded:
        final_step = broadcast_object_list([final_step])[0]
    if acc.is_main_process or sharded:
        _load_best(recipe, run_dir, state, final_step, validator, raw_unet, raw_te, ema, rank)
        if ema is not None and recipe.ema.use_for_final:
            ema.copy_to(named_parameters(raw_unet, raw_te))
    unet, te = whole_models(recipe, acc, models, raw_unet, raw_te)
    if acc.is_main_process:
        if recipe.logging.data_order and sharded:
            append_jsonl(run_dir / "data_order" / f"rank-{acc.process_index}.jsonl",
                         {"step": state["step"], "unet_sha256": module_hash(unet)})
        if models.weight_dtype != torch.float32:
            for m in (models.pipe.vae, models.text_encoder, unet, te):
                m.to(torch.float32)
        export_models(recipe, models, unet, te, final, single_file=recipe.checkpoint.single_file)
        stopper = validator.stopper if validator is not None else None
        atomic_write_json(run_dir / "train_summary.json", {
            "final": str(final), "steps": state["step"], "epochs_started": state["epoch"], "stopped": reason,
            "best_step": stopper.best_step if stopper else None, "best_value": stopper.best if stopper else None,
            "early_stopping_metric": recipe.validation.early_stopping_metric, "final_weights_step": final_step,
            "recipe": to_dict(recipe), **record(),
        })
    acc.wait_for_everyone()
    acc.end_training()
    return final


def export_models(recipe: Recipe, models: Models, raw_unet, raw_te, out_dir: Path, single_file: bool) -> Path:
    """A diffusers folder at ``out_dir`` (LoRA runs: the LoRA weights beside it, merged into the base)."""
    from diffusers import StableDiffusionPipeline

    if recipe.lora.enabled:
        lora_dir = save_lora(raw_unet, raw_te, out_dir.parent / f"{out_dir.name}-lora"
                             if out_dir.name != "final" else out_dir.parent / "lora")
        pipe = merge_lora(recipe.model.source, lora_dir, allow_pickle=recipe.model.allow_pickle)
        pipe.scheduler = models.pipe.scheduler
    else:
        parts = {**models.pipe.components, "unet": raw_unet, "text_encoder": raw_te}
        pipe = StableDiffusionPipeline(**parts)
    return export_pipeline(pipe, out_dir, single_file=single_file)
