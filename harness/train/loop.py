"""The training loop on accelerate: ``train(recipe) -> Path`` (the run's ``final/`` folder).

Run layout (``recipe.output_dir``)::

    recipe.yaml            the fully resolved recipe     provenance.json   versions, hardware, command
    metrics.jsonl          one record per logged step    logs/             TensorBoard (accelerate tracker)
    checkpoints/step-N/    resumable state (last K)      samples/step-N/   fixed-seed PNGs (prompt in metadata)
    stages/NAME/           diffusers export at the end of each stage of a multi-stage recipe
    final/  final.safetensors   diffusers folder and single file     lora/   LoRA weights alone (LoRA runs)
    train_summary.json     steps, why it stopped, best validation step

Every random draw of a step (latent sample, noise, timesteps) comes from a generator seeded by
(seed, step, micro-batch, rank), and data order from (seed, epoch), so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import to_dict
from harness.errors import ConfigError, HarnessError
from harness.io import append_jsonl, atomic_write_json, atomic_write_text
from harness.provenance import record
from harness.train import checkpoint as ckpt
from harness.train import losses
from harness.train.accel import (
    build_accelerator,
    full_state,
    is_deepspeed,
    is_sharded,
    no_zero3_init,
    reshard,
    shard_rank,
)
from harness.train.cache import (
    LatentCache,
    TextCache,
    default_cache_dir,
    encode_latent_dist,
    encode_text,
    module_hash,
    sample_latents,
)
from harness.train.ema import EMA
from harness.train.metrics_log import MetricsLog, StepTimer, memory_stats
from harness.train.pipeline import check_architecture, export_pipeline, load_base, merge_lora, save_lora
from harness.train.recipe import Recipe, StageCfg, recipe_yaml
from harness.train.timesteps import check_range, evenly_spaced, sample_timesteps
from harness.train.validation import (
    EarlyStopping,
    Scorer,
    ValItem,
    build_scorers,
    check_scorers,
    drift_scorer,
    generate_samples,
    validation_loss,
)

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(HarnessError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was written."""


@dataclass
class Models:
    pipe: object  # the base pipeline; its vae / tokenizer / scheduler are shared
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str
    scaling_factor: float
    weight_dtype: torch.dtype
    input_dtype: torch.dtype | None = None  # DeepSpeed casts the UNet itself and autocasts nothing


@dataclass
class Data:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    sampler: object
    steps_per_epoch: int


# ---------------------------------------------------------------- checks before any long work

def check_optimizer(name: str) -> None:
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("key 'train.optimizer' = 'adamw8bit': needs bitsandbytes, which is not installed "
                              "(pip install 'harness[adam8bit]'), or set train.optimizer=adamw") from None


def check_output_dir(run_dir: Path, resume: str | None) -> None:
    """A new run never overwrites an earlier one: continuing it takes --resume."""
    if resume is None and (ckpt.list_checkpoints(run_dir) or (run_dir / "final").exists()):
        raise HarnessError(f"output_dir = {run_dir}: holds an earlier run's checkpoints or final/; pass "
                           f"--resume latest to continue it, or choose another output_dir")


# ---------------------------------------------------------------- models

def build_models(recipe: Recipe, device: torch.device) -> Models:
    from diffusers import DDPMScheduler

    pipe = load_base(recipe.model.source, allow_pickle=recipe.model.allow_pickle)
    check_architecture(pipe, recipe.model.source)
    pred = recipe.model.prediction_type or pipe.scheduler.config.get("prediction_type", "epsilon")
    if pred != pipe.scheduler.config.get("prediction_type"):
        # The exported model must sample with what it was trained to predict.
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=pred)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    wd = WEIGHT_DTYPES[recipe.train.mixed_precision]
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    vae.requires_grad_(False).eval()
    te.requires_grad_(False).eval()
    if recipe.lora.enabled:
        add_lora(unet, te, recipe)
    else:
        unet.requires_grad_(True)
    unet.train()
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if recipe.lora.text_encoder:
            te.gradient_checkpointing_enable()
    vae.to(device, dtype=wd)
    te.to(device, dtype=torch.float32 if recipe.lora.text_encoder else wd)
    unet.to(device)
    if recipe.lora.enabled and wd != torch.float32:
        unet.to(dtype=wd)  # frozen base weights in low precision; trainable LoRA weights stay fp32
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return Models(pipe=pipe, unet=unet, text_encoder=te, alphas_cumprod=noise_scheduler.alphas_cumprod.clone(),
                  num_train_timesteps=noise_scheduler.config.num_train_timesteps, prediction_type=pred,
                  scaling_factor=float(vae.config.scaling_factor), weight_dtype=wd)


def add_lora(unet, text_encoder, recipe: Recipe) -> None:
    from peft import LoraConfig

    c = recipe.lora
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, init_lora_weights="gaussian",
                                target_modules=list(c.unet_targets)))
    if c.text_encoder:
        from peft import inject_adapter_in_model

        # peft directly, not transformers' text_encoder.add_adapter: transformers 5 refuses peft < 0.22 there,
        # and this is the call it wraps. The adapter is peft's "default", as diffusers' LoRA saving expects.
        text_encoder.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                           init_lora_weights="gaussian", target_modules=list(c.text_encoder_targets)),
                                text_encoder)


def fingerprint(models: Models, recipe: Recipe, shards: int | None = None, engine: str | None = None) -> dict:
    """What a checkpoint must share with this run to be resumable into it (under FSDP2, the number of
    processes when parameters are sharded: each holds its own EMA shard; under DeepSpeed, the engine: its checkpoints are its own)."""
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    trainable = [(n, tuple(p.shape)) for m in (models.unet, models.text_encoder)
                 for n, p in m.named_parameters() if p.requires_grad]
    fp = {"unet_config": digest(dict(models.unet.config)), "trainable": digest(trainable),
          "ema": recipe.ema.enabled, "prediction_type": models.prediction_type}
    if shards is not None:  # only then: unsharded checkpoints written before these keys stay resumable
        fp["shards"] = shards
    if engine is not None:
        fp["engine"] = engine
    return fp


# ---------------------------------------------------------------- data

def build_data(recipe: Recipe, num_processes: int, process_index: int) -> Data:
    from harness.data.buckets import BucketBatchSampler, make_buckets
    from harness.data.folder import scan_dataset
    from harness.data.loader import ImageCaptionDataset

    d, t = recipe.data, recipe.train
    root = Path(d.root)
    if not root.is_dir():
        raise HarnessError(f"data.root = {root}: no such folder")
    scan = dict(max_pixels=d.max_pixels, val_fraction=d.val_fraction) if d.max_pixels else dict(
        val_fraction=d.val_fraction)
    index = scan_dataset(root, split="train", **scan)
    if not index.items:
        why = f" ({len(index.skipped)} skipped, e.g. {index.skipped[0][0]}: {index.skipped[0][1]})" if index.skipped else ""
        raise HarnessError(f"data.root = {root}: no usable training images{why}")
    captioned = [it for it in index.items if it.caption]
    if not captioned:
        raise HarnessError(f"data.root = {root}: none of the {len(index.items)} training images has a caption "
                           f"(a .txt next to each image or a 'text' column in metadata.jsonl); run 'harness caption'")
    if len(captioned) < len(index.items):
        log.warning("%s: %d of %d training images have no caption; training on the %d that do", root,
                    len(index.items) - len(captioned), len(index.items), len(captioned))
    index.items = captioned
    need = t.batch_size * num_processes * t.grad_accum
    if len(captioned) < need:
        raise HarnessError(f"train.batch_size = {t.batch_size}: one step needs {need} images (batch_size x "
                           f"grad_accum x {num_processes} process(es)) but {root} has {len(captioned)} captioned "
                           f"training images")
    kw = dict(resolution=d.resolution, resize_filter=d.resize_filter, random_crop=d.random_crop, flip_p=d.flip_p,
              shuffle_tags_after=d.shuffle_tags_after, caption_dropout=d.caption_dropout, seed=t.seed,
              buckets=make_buckets(d.resolution, step=d.bucket_step) if d.buckets else None,
              **({"max_pixels": d.max_pixels} if d.max_pixels else {}))
    train_ds = ImageCaptionDataset(index, **kw)
    val_index = scan_dataset(root, split="val", **scan)
    val_ds = None
    if val_index.items:
        val_ds = ImageCaptionDataset(val_index, **{**kw, "random_crop": False, "flip_p": 0.0, "caption_dropout": 0.0,
                                                   "shuffle_tags_after": None})
    sampler = BucketBatchSampler(train_ds.target_sizes, t.batch_size, seed=t.seed, drop_last=True,
                                 num_replicas=num_processes, rank=process_index)
    steps = len(sampler) // t.grad_accum
    if steps < 1:
        raise HarnessError(f"train.batch_size = {t.batch_size}: no full batch fits in one size bucket of {root}; "
                           f"lower the batch size or set data.buckets=false")
    return Data(train=train_ds, val=val_ds, sampler=sampler, steps_per_epoch=steps)


class CachedLatentDataset(torch.utils.data.Dataset):
    """Training items read from the latent cache: no image decoding after the first pass."""

    def __init__(self, source, keys: dict[int, str], cache: LatentCache):
        self.source, self.keys, self.cache = source, keys, cache
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        from harness.data.loader import process_caption

        s = self.source
        # The same per-(seed, epoch, index) draw ImageCaptionDataset makes (no crop/flip draws: caching
        # is refused with those on), so cached and uncached runs see identical captions.
        rng = random.Random(f"{s.seed}:{self.epoch}:{i}")
        caption = process_caption(s.items[i].caption, shuffle_tags_after=s.shuffle_tags_after,
                                  caption_dropout=s.caption_dropout, rng=rng)
        return {"dist": self.cache.get(self.keys[i]), "caption": caption, "key": self.keys[i], "index": i}


def collate(items: list[dict]) -> dict:
    out = {"caption": [it["caption"] for it in items], "key": [it["key"] for it in items],
           "index": [it["index"] for it in items]}
    for name in ("pixel_values", "dist"):
        if name in items[0]:
            out[name] = torch.stack([it[name] for it in items])
    return out


def epoch_loader(data: Data, dataset, epoch: int, start_step: int, grad_accum: int, num_workers: int):
    """This rank's micro-batches of ``epoch``, from optimizer step ``start_step`` on."""
    data.sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    batches = list(data.sampler)[start_step * grad_accum: data.steps_per_epoch * grad_accum]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate)


# ---------------------------------------------------------------- one step

def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    h = hashlib.sha256(f"{seed}:{step}:{micro}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "big") & (2**63 - 1))


def encode_batch(batch: dict, models: Models, text_cache: TextCache | None, train_text: bool):
    """(latent distribution, text hidden states) for a batch, from the caches when they are on."""
    dist = batch["dist"] if "dist" in batch else encode_latent_dist(models.pipe.vae, batch["pixel_values"])
    if text_cache is not None:
        hidden = text_cache(batch["caption"])
    else:
        with torch.set_grad_enabled(train_text):
            hidden = encode_text(models.text_encoder, models.pipe.tokenizer, batch["caption"])
    return dist, hidden


def diffusion_loss(unet, models: Models, dist: torch.Tensor, hidden: torch.Tensor, stage: StageCfg,
                   recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    t_cfg = recipe.train
    device = next(unet.parameters()).device
    x0 = sample_latents(dist.cpu(), models.scaling_factor, gen)
    noise = losses.offset_noise(tuple(x0.shape), t_cfg.noise_offset, gen)
    t = sample_timesteps(len(x0), stage.t_min, stage.t_max or models.num_train_timesteps, gen)
    noisy = losses.add_noise(x0, noise, t, models.alphas_cumprod)
    tgt = losses.target(models.prediction_type, x0, noise, t, models.alphas_cumprod)
    dt = models.input_dtype
    pred = unet(noisy.to(device, dt), t.to(device), hidden.to(device, dt), return_dict=False)[0]
    weights = None
    if t_cfg.min_snr_gamma:
        weights = losses.min_snr_weights(losses.snr(t, models.alphas_cumprod), t_cfg.min_snr_gamma,
                                         models.prediction_type).to(device)
    return losses.weighted_mse(pred, tgt.to(device), weights)


# ---------------------------------------------------------------- optimizer and schedule

def build_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.train
    kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def build_lr_scheduler(optimizer, stage: StageCfg, total_steps: int, name: str):
    from diffusers.optimization import get_scheduler

    for g in optimizer.param_groups:  # each stage starts from its own learning rate
        g["lr"] = g["initial_lr"] = stage.lr
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


# ---------------------------------------------------------------- validation

class Validator:
    """Validation loss on held-out items, fixed-seed samples and scorers. Runs on the main process; with
    sharded parameters (FSDP2, ZeRO-3) on every process (each forward gathers the shards from all of them), with only the main
    process writing samples and scoring them."""

    def __init__(self, recipe: Recipe, models: Models, data: Data, latent_cache, text_fn, run_dir: Path,
                 scorers: dict[str, Scorer], main: bool = True):
        v = recipe.validation
        self.recipe, self.models, self.run_dir, self.main = recipe, models, run_dir, main
        self.scorers = build_scorers(list(v.eval_metrics), scorers, dict(v.scorer_models),
                                     models.unet.device) if main else {}
        stage0 = recipe.resolved_stages()[0]
        self.timesteps = list(v.timesteps) if v.timesteps else evenly_spaced(
            stage0.t_min, stage0.t_max or models.num_train_timesteps)
        self.items = self._val_items(data.val, latent_cache, text_fn, v.max_items)
        self.stopper = EarlyStopping(v.early_stopping_patience, v.early_stopping_mode, v.early_stopping_min_delta)
        if not self.items:
            log.info("no validation split in %s (metadata 'split' column, val/ folder or data.val_fraction): "
                     "no validation loss", recipe.data.root)

    @torch.no_grad()
    def _val_items(self, dataset, latent_cache, text_fn, max_items) -> list[ValItem]:
        if dataset is None:
            return []
        n = min(len(dataset), max_items or len(dataset))
        items = []
        for i in range(n):
            it = dataset[i]
            if latent_cache is not None:
                dist = latent_cache.get(latent_cache.fill(dataset, [i])[i])
            else:
                dist = encode_latent_dist(self.models.pipe.vae, it["pixel_values"][None])[0]
            items.append(ValItem(dist=dist.cpu(), hidden=text_fn([it["caption"]])[0].float().cpu()))
        return items

    def run(self, step: int, unet, text_encoder) -> dict:
        out: dict = {}
        was_training = unet.training
        unet.eval()
        dtype = self.models.weight_dtype
        amp = torch.autocast(unet.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        samples = []
        try:
            with amp:  # the model as it trains; the scorers below run as they do in 'harness eval'
                if self.items:
                    out.update(validation_loss(unet, self.items, self.timesteps, self.models.alphas_cumprod,
                                               self.models.prediction_type, self.models.scaling_factor,
                                               self.recipe.validation.noise_seed))
                if self.recipe.validation.prompts:
                    samples = self._samples(step, unet, text_encoder)
        finally:
            unet.train(was_training)
        if samples and self.main:
            out.update(self._score(samples))
        return out

    def _samples(self, step: int, unet, text_encoder) -> list:
        from diffusers import StableDiffusionPipeline

        v = self.recipe.validation
        pipe = StableDiffusionPipeline(**{**self.models.pipe.components, "unet": unet, "text_encoder": text_encoder})
        pipe.set_progress_bar_config(disable=True)
        samples = generate_samples(pipe, list(v.prompts), list(v.seeds), steps=v.num_inference_steps,
                                   guidance=v.guidance_scale, resolution=self.recipe.data.resolution,
                                   out_dir=self.run_dir / "samples" / ckpt.checkpoint_name(step) if self.main
                                   else None, step=step)
        return samples

    def _score(self, samples: list) -> dict:
        """The eval hook's scores of the fixed-seed samples, in full precision whatever the run trains in,
        so they compare with the eval suite's numbers."""
        v = self.recipe.validation
        images, prompts = [s[2] for s in samples], [s[0] for s in samples]
        if "drift" in v.eval_metrics and "drift" not in self.scorers:
            self.scorers["drift"] = drift_scorer(self._reference(images))
        return {f"eval/{name}": float(self.scorers[name](images, prompts)) for name in v.eval_metrics}

    def _reference(self, images: list) -> list:
        """The base model's samples: step 0's PNGs (also after a resume), else these images."""
        from PIL import Image

        v = self.recipe.validation
        folder = self.run_dir / "samples" / ckpt.checkpoint_name(0)
        paths = [folder / f"p{pi:02d}-s{seed}.png" for pi in range(len(v.prompts)) for seed in v.seeds]
        if all(p.is_file() for p in paths):
            return [Image.open(p).convert("RGB") for p in paths]
        return images

    def should_stop(self, step: int, results: dict) -> bool:
        metric = self.recipe.validation.early_stopping_metric
        if metric not in results:
            return False
        return self.stopper.update(step, results[metric])


# ---------------------------------------------------------------- the run

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(recipe: Recipe, *, resume: str | None = None, scorers: dict[str, Scorer] | None = None) -> Path:
    """Fine-tune per ``recipe``; ``resume`` is ``"latest"`` or a checkpoint folder. ``scorers`` maps
    names used in ``validation.eval_metrics`` to ``(images, prompts) -> float`` callables. Returns
    ``output_dir/final`` (a diffusers folder)."""
    from accelerate.utils import set_seed

    run_dir = Path(recipe.output_dir)
    scorers = dict(scorers or {})
    check_optimizer(recipe.train.optimizer)
    check_scorers(list(recipe.validation.eval_metrics), scorers, dict(recipe.validation.scorer_models))
    check_output_dir(run_dir, resume)
    acc = build_accelerator(recipe, run_dir)
    data = build_data(recipe, acc.num_processes, acc.process_index)
    set_seed(recipe.train.seed)
    with no_zero3_init(acc):
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
        ckpt.clean_stale(run_dir)
        atomic_write_text(run_dir / "recipe.yaml", recipe_yaml(recipe))
        atomic_write_json(run_dir / "provenance.json", record(seed=recipe.train.seed, resumed_from=str(resume_path)))
    acc.wait_for_everyone()
    return _run(recipe, acc, models, data, stages, run_dir, resume_path, scorers)


def _caches(recipe: Recipe, acc, models: Models, data: Data):
    cache_root = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_dir()
    text_cache = TextCache(cache_root, models.text_encoder, models.pipe.tokenizer) if recipe.data.cache_text else None
    latent_cache, train_ds = None, data.train
    if recipe.data.cache_latents:
        latent_cache = LatentCache(cache_root, models.pipe.vae)
        from accelerate.utils import gather_object

        mine = list(range(acc.process_index, len(data.train), acc.num_processes))
        mine_keys = latent_cache.fill(data.train, mine, progress=acc.is_main_process)
        keys = dict(gather_object(list(mine_keys.items())))  # each rank encodes a share; all read all
        acc.wait_for_everyone()
        log.info("latent cache %s: %d hits, %d misses", latent_cache.store.dir, latent_cache.store.hits,
                 latent_cache.store.misses)
        train_ds = CachedLatentDataset(data.train, keys, latent_cache)
    return latent_cache, text_cache, train_ds


def _run(recipe, acc, models: Models, data: Data, stages, run_dir: Path, resume_path, scorers) -> Path:
    latent_cache, text_cache, train_ds = _caches(recipe, acc, models, data)
    train_text = recipe.lora.text_encoder

    def text_fn(captions):
        if text_cache is not None:
            return text_cache(captions)
        with torch.no_grad():
            return encode_text(models.text_encoder, models.pipe.tokenizer, captions)

    sharded, rank = is_sharded(acc), shard_rank(acc)
    if is_deepspeed(acc) and models.weight_dtype != torch.float32:
        models.input_dtype = models.weight_dtype
    validator = Validator(recipe, models, data, latent_cache, text_fn, run_dir, scorers,
                          main=acc.is_main_process) if acc.is_main_process or sharded else None
    params = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = build_optimizer(recipe, params)
    if train_text:
        unet, text_encoder, optimizer = acc.prepare(models.unet, models.text_encoder, optimizer)
    else:
        unet, optimizer = acc.prepare(models.unet, optimizer)
        text_encoder = models.text_encoder
    raw_unet, raw_te = acc.unwrap_model(unet), acc.unwrap_model(text_encoder)
    named = lambda: named_parameters(raw_unet, raw_te)  # noqa: E731
    ema = EMA(named(), recipe.ema.decay, recipe.ema.update_after_step) if recipe.ema.enabled else None
    fp = fingerprint(models, recipe, acc.num_processes if sharded else None, "deepspeed" if is_deepspeed(acc) else None)
    state = {"step": 0, "stage": 0, "stage_step": 0, "epoch": 0, "step_in_epoch": 0, "early_stopping": {},
             "fingerprint": fp}
    if resume_path is not None:
        state = ckpt.load_checkpoint(acc, resume_path, fp, ema, rank)
    metrics = MetricsLog(acc, run_dir)
    metrics.truncate_after(state["step"])
    if validator is not None:
        validator.stopper.load(state.get("early_stopping", {}))
    # W&B writes its run folder (and, offline, its whole log) into the run, not into the current directory.
    acc.init_trackers(recipe.logging.project, config=_flat(to_dict(recipe)),
                      init_kwargs={"wandb": {"dir": str(run_dir / "logs"), "name": run_dir.name}})
    totals = stage_totals(stages, data.steps_per_epoch, recipe.train.max_steps)
    last_ckpt = [resume_path]
    keep_best = keeps_best(recipe)
    stop = {"reason": "completed"}

    def save():
        if validator is not None:
            state["early_stopping"] = validator.stopper.state()
        last_ckpt[0] = ckpt.save_checkpoint(acc, run_dir, dict(state), lr_scheduler, ema, recipe.checkpoint.keep_last,
                                            rank)

    def validate() -> bool:
        from accelerate.utils import broadcast_object_list

        stop_now, best_now = False, False
        if validator is not None:
            results = validator.run(state["step"], raw_unet, raw_te)
            reshard(acc, raw_unet, raw_te)
            if acc.is_main_process:
                if results:
                    metrics.write(state["step"], results)
                    log.info("step %d: %s", state["step"], ", ".join(f"{k} {v:.4g}" for k, v in results.items()
                                                                     if "/t=" not in k))
                stop_now = validator.should_stop(state["step"], results)
                best_now = keep_best and validator.stopper.best_step == state["step"]
        stop_now, best_now = broadcast_object_list([stop_now, best_now])
        if best_now and (acc.is_main_process or sharded):
            ckpt.save_best(run_dir, state["step"], named(), ema, rank)
        return stop_now

    from tqdm.auto import tqdm

    timer = StepTimer(recipe.logging.timing, acc.device)
    window = [time.perf_counter(), 0, 0.0]  # start, steps, summed loss since the last log line
    bar = tqdm(total=sum(totals), initial=state["step"], disable=not acc.is_main_process, desc="training")
    if state["step"] == 0 and recipe.validation.at_start:
        validate()
    lr_scheduler = None
    while state["stage"] < len(stages) and stop["reason"] == "completed":
        si = state["stage"]
        stage, total = stages[si], totals[si]
        lr_scheduler = build_lr_scheduler(optimizer, stage, total, recipe.train.lr_scheduler)
        if resume_path is not None and state["stage_step"] > 0:
            ckpt.load_lr_scheduler(resume_path, lr_scheduler)
        while state["stage_step"] < total and stop["reason"] == "completed":
            loader = epoch_loader(data, train_ds, state["epoch"], state["step_in_epoch"], recipe.train.grad_accum,
                                  recipe.data.num_workers)
            it = iter(loader)
            while state["step_in_epoch"] < data.steps_per_epoch and state["stage_step"] < total:
                loss = _optimizer_step(recipe, acc, models, unet, optimizer, it, text_cache, stage, state,
                                       last_ckpt[0], train_text, timer)
                lr_now = lr_scheduler.get_last_lr()[0]
                if step_applied(acc, optimizer, state, last_ckpt[0], recipe):
                    lr_scheduler.step()
                    if ema is not None:
                        ema.update(named())
                state["step"] += 1
                state["stage_step"] += 1
                state["step_in_epoch"] += 1
                bar.update(1)
                _log_step(recipe, acc, metrics, state, window, loss, lr_now, stage, timer)
                if recipe.validation.every_steps and state["step"] % recipe.validation.every_steps == 0 and validate():
                    stop["reason"] = "early_stopping"
                due = recipe.checkpoint.every_steps and state["step"] % recipe.checkpoint.every_steps == 0
                if (due and state["stage_step"] < total) or stop["reason"] != "completed":
                    save()  # the last step of a stage is saved by _end_stage
                if stop["reason"] != "completed":
                    break
            if state["step_in_epoch"] >= data.steps_per_epoch:
                state["epoch"] += 1
                state["step_in_epoch"] = 0
        if stop["reason"] == "completed":
            _end_stage(recipe, acc, state, stages, models, raw_unet, raw_te, run_dir, save, validate)
    bar.close()
    return _finish(recipe, acc, models, raw_unet, raw_te, ema, run_dir, state, stop["reason"], validator)


def _end_stage(recipe, acc, state, stages, models, raw_unet, raw_te, run_dir, save, validate) -> None:
    si = state["stage"]
    if state["step_in_epoch"]:  # a stage cut short by max_steps: the next one starts a fresh epoch
        state["epoch"] += 1
        state["step_in_epoch"] = 0
    last_stage = si == len(stages) - 1
    if not (recipe.validation.every_steps and state["step"] % recipe.validation.every_steps == 0):
        validate()
    state["stage"] += 1
    state["stage_step"] = 0
    save()  # at the stage boundary, so a resume starts the next stage (overwrites a same-step save)
    if len(stages) > 1 and not last_stage:
        unet, te = whole_models(recipe, acc, models, raw_unet, raw_te)
        if acc.is_main_process:
            _export(recipe, models, unet, te, run_dir / "stages" / stages[si].name, single_file=False)
    acc.wait_for_everyone()


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
                loss = diffusion_loss(unet, models, dist, hidden.to(acc.device), stage, recipe, gen)
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
                               f"applying it, {_what_to_do(last_good, recipe)}")


def _what_to_do(last_good, recipe: Recipe) -> str:
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
                               f"{_what_to_do(last_good, recipe)}")
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


def _export(recipe: Recipe, models: Models, raw_unet, raw_te, out_dir: Path, single_file: bool) -> Path:
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


def whole_models(recipe: Recipe, acc, models: Models, raw_unet, raw_te):
    """The trained UNet and text encoder with all their weights, on the main process (called on every
    process). Unsharded runs already hold them; under FSDP2 / ZeRO-3 the full state is gathered from the
    shards and loaded into a fresh unsharded copy of the base model (with the LoRA layers, for LoRA runs)."""
    if not is_sharded(acc):
        return raw_unet, raw_te
    unet_state = full_state(acc, raw_unet)
    te_trained = any(p.requires_grad for p in raw_te.parameters())
    te_state = full_state(acc, raw_te) if te_trained else None
    if not acc.is_main_process:
        return None, None
    pipe = load_base(recipe.model.source, allow_pickle=recipe.model.allow_pickle)
    if recipe.lora.enabled:
        add_lora(pipe.unet, pipe.text_encoder, recipe)
    pipe.unet.load_state_dict(unet_state)
    if te_state is None:
        return pipe.unet, raw_te
    pipe.text_encoder.load_state_dict(te_state)
    return pipe.unet, pipe.text_encoder


def named_parameters(unet, text_encoder) -> list[tuple[str, torch.nn.Parameter]]:
    """Both models' parameters under one namespace (``unet.*``, ``te.*``): the names EMA and the best
    weights are stored under."""
    return [(f"unet.{n}", p) for n, p in unet.named_parameters()] + [
        (f"te.{n}", p) for n, p in text_encoder.named_parameters()]


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


def _finish(recipe, acc, models, raw_unet, raw_te, ema, run_dir: Path, state, reason: str, validator) -> Path:
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
        _export(recipe, models, unet, te, final, single_file=recipe.checkpoint.single_file)
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


def train_from_file(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, resume: str | None = None,
                    scorers: dict[str, Scorer] | None = None) -> Path:
    """:func:`train` on a recipe file with ``key=value`` overrides."""
    from harness.train.recipe import load_recipe

    return train(load_recipe(path, overrides), resume=resume, scorers=scorers)


