"""The training recipe: frozen dataclasses loaded from YAML with :func:`harness.config.load_config`.

Every key has a default except ``model.source``, ``data.root`` and ``output_dir``, so a recipe can be a
few lines that ``extends:`` a shipped one. Cross-field rules (a timestep range that is empty, a cache
that would freeze random crops) fail at load time, before any model is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from harness.config import dump_yaml, load_config

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


def _r(lo=None, hi=None, help: str = "") -> dict:
    return {"min": lo, "max": hi, "help": help}


@dataclass(frozen=True)
class ModelCfg:
    source: str  # hub id, diffusers folder or single-file .safetensors
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the base model's own
    allow_pickle: bool = False  # .ckpt files run code when loaded


@dataclass(frozen=True)
class DataCfg:
    root: str
    resolution: int = field(default=512, metadata=_r(8, 4096))
    resize_filter: Literal["bicubic", "bilinear", "lanczos", "nearest"] = "bicubic"
    random_crop: bool = False
    flip_p: float = field(default=0.0, metadata=_r(0.0, 1.0))
    shuffle_tags_after: int | None = field(default=None, metadata=_r(0))
    caption_dropout: float = field(default=0.0, metadata=_r(0.0, 1.0))  # applied per step, cache-safe
    max_pixels: int | None = field(default=None, metadata=_r(1))
    val_fraction: float = field(default=0.0, metadata=_r(0.0, 0.99))  # images without a split go to val by hash
    buckets: bool = False  # aspect-ratio buckets around data.resolution instead of square crops
    bucket_step: int = field(default=64, metadata=_r(8, 1024))  # bucket sides are multiples of this
    cache_latents: bool = True
    cache_text: bool = True
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/harness/train (shared across runs)
    num_workers: int = field(default=0, metadata=_r(0, 64))
    # Prior preservation (DreamBooth; sd-scripts' reg_data_dir / prior_loss_weight): captioned class images
    # trained alongside data.root, as many per epoch as there are training images (repeated or cut, as
    # sd-scripts does), each one's loss scaled by reg_weight.
    reg_root: str | None = None
    reg_weight: float = field(default=1.0, metadata=_r(0.0, 100.0))

    def __post_init__(self):
        if self.resolution % 8:
            raise ValueError(f"key 'data.resolution' = {self.resolution}: expected a multiple of 8 (the VAE "
                             f"downsamples by 8), e.g. {self.resolution // 8 * 8 or 8}")
        if self.buckets and (self.bucket_step % 8 or self.resolution % self.bucket_step):
            raise ValueError(f"key 'data.bucket_step' = {self.bucket_step}: expected a multiple of 8 that divides "
                             f"data.resolution = {self.resolution} (buckets are sized around it in these steps)")
        if self.cache_latents and (self.random_crop or self.flip_p > 0):
            raise ValueError("key 'data.cache_latents' = True with random_crop/flip_p: a cached latent would freeze "
                             "one crop and flip; set data.cache_latents=false or turn the augmentation off")


@dataclass(frozen=True)
class TrainCfg:
    seed: int = field(default=0, metadata=_r(0, 2**32 - 1))  # numpy and torch seeds are 32-bit here
    batch_size: int = field(default=1, metadata=_r(1, 4096))  # per process
    grad_accum: int = field(default=1, metadata=_r(1, 1024))
    epochs: int = field(default=1, metadata=_r(1))
    max_steps: int | None = field(default=None, metadata=_r(1))  # optimizer steps; caps epochs (and all stages)
    lr: float = field(default=1e-5, metadata=_r(0.0, 1.0))  # the UNet's (LoRA: its adapters'); stages may set their own
    text_encoder_lr: float | None = field(default=None, metadata=_r(0.0, 1.0))  # None: the same as the UNet's
    lr_scheduler: LrScheduler = "constant"
    warmup_steps: int = field(default=0, metadata=_r(0))
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: float = field(default=0.9, metadata=_r(0.0, 1.0))
    adam_beta2: float = field(default=0.999, metadata=_r(0.0, 1.0))
    adam_eps: float = field(default=1e-8, metadata=_r(0.0, 1.0))
    weight_decay: float = field(default=1e-2, metadata=_r(0.0, 1.0))
    max_grad_norm: float | None = field(default=1.0, metadata=_r(0.0))
    # YAML 1.1 reads a bare `no` as false, so false is accepted and means "no".
    mixed_precision: Literal["no", "fp16", "bf16", False] = "no"
    gradient_checkpointing: bool = False
    t_min: int = field(default=0, metadata=_r(0, 100000))  # timesteps drawn from [t_min, t_max)
    t_max: int | None = field(default=None, metadata=_r(1, 100000))  # None: the schedule's length
    min_snr_gamma: float | None = field(default=None, metadata=_r(0.0))
    noise_offset: float = field(default=0.0, metadata=_r(0.0, 1.0))
    # Condition on the text encoder's n-th layer from the end (1: the last, as SD 1.5 itself; 2: A1111's
    # "clip skip 2"), through the final layer norm, as sd-scripts does. Sampling with the same setting is
    # the user's choice there; validation here uses it too.
    clip_skip: int | None = field(default=None, metadata=_r(1, 12))
    cpu: bool = False  # force the CPU even when a GPU is present

    def __post_init__(self):
        if self.mixed_precision is False:
            object.__setattr__(self, "mixed_precision", "no")
        if self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError(f"key 'train.t_max' = {self.t_max}: expected more than train.t_min = {self.t_min}")


@dataclass(frozen=True)
class LoraCfg:
    enabled: bool = False
    rank: int = field(default=4, metadata=_r(1, 1024))
    alpha: float = field(default=4.0, metadata=_r(0.0))
    dropout: float = field(default=0.0, metadata=_r(0.0, 1.0))
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass(frozen=True)
class EmaCfg:
    enabled: bool = False
    decay: float = field(default=0.9999, metadata=_r(0.0, 1.0))
    update_after_step: int = field(default=0, metadata=_r(0))
    use_for_final: bool = True  # export the EMA weights as final/ (the raw weights stay in checkpoints)


@dataclass(frozen=True)
class ValidationCfg:
    every_steps: int = field(default=0, metadata=_r(0))  # 0: only at the end
    timesteps: list[int] | None = None  # None: 5 evenly spaced in [t_min, t_max)
    noise_seed: int = field(default=1234, metadata=_r(0, 2**32 - 1))
    max_items: int | None = field(default=None, metadata=_r(1))
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    num_inference_steps: int = field(default=25, metadata=_r(1, 1000))
    guidance_scale: float = field(default=7.5, metadata=_r(0.0, 100.0))
    eval_metrics: list[str] = field(default_factory=list)  # scorer names, see harness.train.validator
    scorer_models: dict[str, str] = field(default_factory=dict)  # e.g. {clip_score: "clip:ViT-B-32:openai"}
    at_start: bool = True  # validate the base model at step 0 (the reference for every later number)
    early_stopping_patience: int | None = field(default=None, metadata=_r(1))
    early_stopping_metric: str = "val_loss"  # or "eval/<scorer>"
    early_stopping_mode: Literal["min", "max"] = "min"
    early_stopping_min_delta: float = field(default=0.0, metadata=_r(0.0))
    # With early stopping on, final/ holds the weights of the best validation (kept in RUN/best.safetensors),
    # not those at the stop, which are patience validations past the best (Hugging Face's load_best_model_at_end).
    restore_best: bool = True


@dataclass(frozen=True)
class CheckpointCfg:
    every_steps: int = field(default=500, metadata=_r(0))  # 0: only at the end
    keep_last: int = field(default=3, metadata=_r(1))
    single_file: bool = True  # also write final.safetensors (original SD layout)
    # final.safetensors' dtype (A1111 / ComfyUI users expect fp16, half the size); final/ keeps the fp32 weights
    single_file_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    # Resume state that FSDP2 (.metadata) and DeepSpeed (*_states.pt) unpickle: loaded only from a
    # checkpoint whose manifest this user's harness signed, unless this is true (you trust the folder)
    allow_pickle: bool = False


@dataclass(frozen=True)
class LoggingCfg:
    every_steps: int = field(default=10, metadata=_r(1))
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    project: str = "harness"
    timing: bool = False  # split each step's time into data / encode / unet / optimizer
    data_order: bool = False  # each rank writes data_order/rank-R.jsonl: the items of every step, for audits


@dataclass(frozen=True)
class StageCfg:
    name: str
    epochs: int = field(default=1, metadata=_r(1))
    lr: float | None = field(default=None, metadata=_r(0.0, 1.0))  # None: train.lr
    max_steps: int | None = field(default=None, metadata=_r(1))
    t_min: int | None = field(default=None, metadata=_r(0, 100000))
    t_max: int | None = field(default=None, metadata=_r(1, 100000))
    warmup_steps: int | None = field(default=None, metadata=_r(0))


@dataclass(frozen=True)
class Recipe:
    model: ModelCfg
    data: DataCfg
    output_dir: str
    train: TrainCfg = field(default_factory=TrainCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    validation: ValidationCfg = field(default_factory=ValidationCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)
    stages: list[StageCfg] = field(default_factory=list)  # empty: one stage from train.epochs/lr

    def __post_init__(self):
        if self.lora.text_encoder and not self.lora.enabled:
            raise ValueError("key 'lora.text_encoder' = True needs lora.enabled=true")
        if self.train.text_encoder_lr is not None and not self.lora.text_encoder:
            raise ValueError(f"key 'train.text_encoder_lr' = {self.train.text_encoder_lr}: the text encoder is not "
                             "trained; set lora.enabled=true lora.text_encoder=true, or drop the key")
        if self.lora.text_encoder and self.data.cache_text:
            raise ValueError("key 'data.cache_text' = True with lora.text_encoder: a trained text encoder "
                             "cannot use cached outputs; set data.cache_text=false")
        bad = [x for x in self.validation.seeds if not 0 <= x < 2**32]
        if bad:
            raise ValueError(f"key 'validation.seeds' = {bad[0]}: expected seeds between 0 and {2**32 - 1}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"key 'stages' = {names}: stage names must be unique")
        for i, s in enumerate(self.stages):
            lo = self.train.t_min if s.t_min is None else s.t_min
            if s.t_max is not None and s.t_max <= lo:
                raise ValueError(f"key 'stages[{i}].t_max' = {s.t_max}: expected more than t_min = {lo}")
        m = self.validation.early_stopping_metric
        if m != "val_loss" and m.removeprefix("eval/") not in self.validation.eval_metrics:
            raise ValueError(f"key 'validation.early_stopping_metric' = {m!r}: expected 'val_loss' or "
                             f"'eval/<name>' for a name in validation.eval_metrics {list(self.validation.eval_metrics)}")

    def resolved_stages(self) -> list[StageCfg]:
        """The stage list with every inherited value filled in (one stage when ``stages`` is empty)."""
        stages = self.stages or [StageCfg(name="main", epochs=self.train.epochs, max_steps=self.train.max_steps)]
        t = self.train
        return [dataclasses.replace(
            s, lr=t.lr if s.lr is None else s.lr, t_min=t.t_min if s.t_min is None else s.t_min,
            t_max=t.t_max if s.t_max is None else s.t_max,
            warmup_steps=t.warmup_steps if s.warmup_steps is None else s.warmup_steps,
            max_steps=s.max_steps if self.stages else t.max_steps,
        ) for s in stages]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (following ``extends:``), apply ``key=value`` overrides, validate everything."""
    return load_config(Recipe, path, list(overrides))


def recipe_yaml(recipe: Recipe) -> str:
    return dump_yaml(recipe)
