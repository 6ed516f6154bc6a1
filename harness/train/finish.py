"""The end of a run: the weights final/ gets (the best validation's when early stopping keeps them,
EMA's when the recipe says so), the diffusers export, and ``train_summary.json``."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from harness.config import to_dict
from harness.io import append_jsonl, atomic_write_json
from harness.models.lora_export import check_kohya_file
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
        export_models(recipe, models, unet, te, final, single_file=recipe.checkpoint.single_file, steps=state["step"])
        stopper = validator.stopper if validator is not None else None
        atomic_write_json(run_dir / "train_summary.json", {
            "final": str(final), "steps": state["step"], "epochs_started": state["epoch"], "stopped": reason,
            "best_step": stopper.best_step if stopper else None, "best_value": stopper.best if stopper else None,
            "early_stopping_metric": recipe.validation.early_stopping_metric, "final_weights_step": final_step,
            "recipe": to_dict(recipe), "recipe_sha256": recipe_sha256(recipe), **record(),
        })
    acc.wait_for_everyone()
    acc.end_training()
    return final


def export_models(recipe: Recipe, models: Models, raw_unet, raw_te, out_dir: Path, single_file: bool,
                  steps: int | None = None) -> Path:
    """A diffusers folder at ``out_dir`` (LoRA runs: the LoRA files beside it, merged into the base)."""
    from diffusers import StableDiffusionPipeline

    if recipe.lora.enabled:
        final = out_dir.name == "final"
        lora_dir = out_dir.parent / "lora" if final else out_dir.parent / f"{out_dir.name}-lora"
        name = Path(recipe.output_dir).name + ("" if final else f"-{out_dir.name}")
        kohya_file = f"{name if name != 'pytorch_lora_weights' else name + '-kohya'}.safetensors"
        meta, ss = lora_metadata(recipe, steps, name)
        save_lora(raw_unet, raw_te, lora_dir, kohya_file=kohya_file, metadata=meta, kohya_metadata=ss)
        pipe = merge_lora(recipe.model.source, lora_dir, allow_pickle=recipe.model.allow_pickle)
        check_kohya_file(lora_dir / kohya_file, pipe)  # names A1111/ComfyUI could not place would be dropped there
        pipe.scheduler = models.pipe.scheduler
    else:
        parts = {**models.pipe.components, "unet": raw_unet, "text_encoder": raw_te}
        pipe = StableDiffusionPipeline(**parts)
    return export_pipeline(pipe, out_dir, single_file=single_file, single_file_dtype=recipe.checkpoint.single_file_dtype)


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(to_dict(recipe), sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def base_facts(source: str) -> dict[str, str]:
    """What identifies the base model a LoRA was trained on (hashed once per process: a full-size base
    is gigabytes). Single files also get A1111's hashes: sha256 and the legacy 8-digit one."""
    from harness.models.load import resolve_source
    from harness.provenance import tree_sha256

    src = resolve_source(source)
    name = src.ref if src.kind == "hub" else Path(src.ref).name
    out = {"harness.base_model": str(source), "ss_sd_model_name": name}
    if src.kind == "hub":
        return {**out, "harness.base_sha256": f"hub:{src.ref}"}
    digest = tree_sha256(src.ref)
    out["harness.base_sha256"] = digest
    if Path(src.ref).is_file():
        with open(src.ref, "rb") as f:  # A1111's legacy model hash: 64 KiB at 1 MiB
            f.seek(0x100000)
            out["ss_sd_model_hash"] = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        out["ss_new_sd_model_hash"] = digest
    return out


def lora_metadata(recipe: Recipe, steps: int | None, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(harness.* metadata for both LoRA files, sd-scripts' ss_* / modelspec keys for the kohya one)."""
    c, t, res = recipe.lora, recipe.train, recipe.data.resolution
    base = base_facts(recipe.model.source)
    meta = {k: v for k, v in base.items() if k.startswith("harness.")}
    meta.update({"harness.recipe_sha256": recipe_sha256(recipe), "harness.steps": str(steps),
                 "harness.resolution": str(res), "harness.trained_by": "harness"})
    te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.lr
    ss = {k: v for k, v in base.items() if k.startswith("ss_")}
    ss.update({
        "ss_network_module": "networks.lora", "ss_network_dim": str(c.rank), "ss_network_alpha": f"{c.alpha:g}",
        "ss_network_dropout": f"{c.dropout:g}", "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "ss_v_parameterization": str(recipe.model.prediction_type == "v_prediction"),
        "ss_resolution": f"({res}, {res})", "ss_steps": str(steps), "ss_output_name": name,
        "ss_learning_rate": f"{t.lr:g}", "ss_unet_lr": f"{t.lr:g}",
        "ss_text_encoder_lr": f"{te_lr:g}" if c.text_encoder else "0", "ss_network_train_unet_only": str(
            not c.text_encoder), "ss_seed": str(t.seed), "ss_mixed_precision": str(t.mixed_precision),
        "ss_noise_offset": f"{t.noise_offset:g}", "ss_min_snr_gamma": str(t.min_snr_gamma),
        "ss_clip_skip": str(t.clip_skip),
        "ss_training_comment": f"harness, recipe sha256 {meta['harness.recipe_sha256'][:16]}",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": name, "modelspec.resolution": f"{res}x{res}",
    })
    return meta, ss
