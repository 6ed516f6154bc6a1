"""The tiny model zoo: seeded, seconds-to-build models with the real architectures' shapes.

Tests, benchmarks and install smoke tests use these instead of downloads. Everything is saved and
loaded through the same code paths users take (``save_pretrained`` folders, open_clip
``local-dir:`` folders, a YOLO yaml plus safetensors weights), so the zoo exercises real loading.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from harness.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

# SD 1.5's noise schedule and scheduler (PNDM with steps_offset=1), shared by tiny and full size.
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "prediction_type": "epsilon",
}

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
    hidden_act="quick_gelu",
)


def build_tiny_sd(seed: int = 0, *, unet: dict | None = None, vae: dict | None = None, text: dict | None = None,
                  prediction_type: str = "epsilon"):
    """An SD-1.5-shaped ``StableDiffusionPipeline`` (x8 VAE, 4 latent channels, cross-attention UNet,
    CLIP text encoder with the real tokenizer) with random weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet_m = UNet2DConditionModel(**{**TINY_UNET, **(unet or {})})
    torch.manual_seed(seed + 1)
    vae_m = AutoencoderKL(**{**TINY_VAE, **(vae or {})})
    torch.manual_seed(seed + 2)
    text_m = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, **(text or {})}))
    scheduler = PNDMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type})
    return StableDiffusionPipeline(
        vae=vae_m, text_encoder=text_m, tokenizer=clip_tokenizer(), unet=unet_m, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_clip(seed: int = 0, cfg: dict | None = None):
    """An open_clip ``CLIP`` (image + text towers, real CLIP tokenizer vocabulary) with random weights."""
    import open_clip

    torch.manual_seed(seed)
    cfg = cfg or TINY_CLIP_CFG
    return open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()


def save_open_clip(model, out_dir: str | Path, cfg: dict, image_size: int) -> Path:
    """Write a folder open_clip loads with ``create_model_and_transforms('local-dir:DIR')``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "open_clip_config.json", {
        "model_cfg": cfg,
        "preprocess_cfg": {"size": image_size, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    })
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


# A 60-word WordPiece vocabulary is enough for BLIP's plumbing; the trained digits zoo widens it.
_BLIP_WORDS = ["a", "an", "the", "photo", "of", "handwritten", "digit", "zero", "one", "two", "three", "four",
               "five", "six", "seven", "eight", "nine", "on", "with", "red", "blue", "green", "black", "white",
               "ink", "background", "cream", "paper", "picture", "image", "small", "large", "number", "and"]


def build_blip_processor(words: list[str] | None = None, image_size: int = 32):
    """A ``BlipProcessor`` with a small BERT WordPiece vocabulary (BLIP's text side is BERT)."""
    import tempfile

    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = specials + sorted(set(words or _BLIP_WORDS)) + [",", "."]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizer(str(Path(d) / "vocab.txt"), bos_token="[DEC]", model_max_length=512)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    image_proc = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_proc, tokenizer=tok)


def build_tiny_blip(seed: int = 0, processor=None, image_size: int = 32):
    """``BlipForConditionalGeneration`` with random weights, plus its processor."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    processor = processor or build_blip_processor(image_size=image_size)
    tok = processor.tokenizer
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": image_size, "patch_size": 8, "projection_dim": 32},
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                     "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id},
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config).eval()
    model.config.text_config.bos_token_id = tok.bos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    return model, processor


# A YOLOv8 layout at a very small width/depth: same head and loss, ~0.3M parameters.
TINY_YOLO_YAML = """# tiny YOLOv8 (harness zoo)
nc: {nc}
scales:
  t: [0.33, 0.125, 256]
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 3, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 6, C2f, [256, True]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [-1, 6, C2f, [512, True]]
  - [-1, 1, Conv, [1024, 3, 2]]
  - [-1, 3, C2f, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]]
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]]
  - [-1, 3, C2f, [256]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 12], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [[-1, 9], 1, Concat, [1]]
  - [-1, 3, C2f, [1024]]
  - [[15, 18, 21], 1, Detect, [nc]]
"""


def yolo_yaml(nc: int = 10) -> str:
    return TINY_YOLO_YAML.format(nc=nc)


def build_tiny_yolo(out_dir: str | Path, seed: int = 0, nc: int = 10, names: list[str] | None = None) -> Path:
    """Write ``model.yaml`` + ``model.safetensors`` + ``names.json`` (no pickle) for a random tiny YOLO.

    Load it with :func:`load_yolo_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model-t.yaml").write_text(yolo_yaml(nc))
    model = load_yolo_dir(out, seed=seed, _weights=False)
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(out / "model.safetensors"))
    atomic_write_json(out / "names.json", names or [str(i) for i in range(nc)])
    return out


def load_yolo_dir(path: str | Path, seed: int = 0, _weights: bool = True):
    """An ultralytics ``YOLO`` built from ``model-t.yaml`` (checked first: see ``yolo_config``) with
    weights from ``model.safetensors``."""
    from harness.models.yolo_config import check_yolo_yaml, ultralytics_env

    ultralytics_env()
    from safetensors.torch import load_file
    from ultralytics import YOLO

    path = Path(path)
    check_yolo_yaml(path / "model-t.yaml")
    torch.manual_seed(seed)
    model = YOLO(str(path / "model-t.yaml"), task="detect")
    if _weights:
        model.model.load_state_dict(load_file(str(path / "model.safetensors")))
        names = json.loads((path / "names.json").read_text())
        model.model.names = dict(enumerate(names))
    model.model.eval()
    return model


def build_zoo(out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """``harness zoo build tiny``: write DIR/sd, DIR/clip, DIR/blip, DIR/yolo (random weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        "sd": lambda d: build_tiny_sd(seed).save_pretrained(str(d), safe_serialization=True),
        "clip": lambda d: save_open_clip(build_tiny_clip(seed), d, TINY_CLIP_CFG, 32),
        "blip": lambda d: _save_blip(d, seed),
        "yolo": lambda d: build_tiny_yolo(d, seed=seed),
    }
    for name, build in parts.items():
        with atomic_dir(out / name, overwrite=overwrite) as tmp:
            log.info("building tiny %s -> %s", name, out / name)
            build(tmp)
    atomic_write_json(out / "zoo.json", {"kind": "tiny", "seed": seed, "parts": list(parts)})
    return out


def _save_blip(d: Path, seed: int) -> None:
    model, processor = build_tiny_blip(seed)
    model.save_pretrained(str(d))
    processor.save_pretrained(str(d))


def build_random_sd15(seed: int = 0, dtype=torch.float16, std: float = 0.02):
    """A full-size SD 1.5 ``StableDiffusionPipeline`` (1.07B parameters, packaged configs) with random
    weights made directly in ``dtype`` (~2 GB in fp16). For export round trips and benchmarks.

    Drawing 1.07B normals takes ~40 s on two cores, so each tensor is a random N(0, std) pool of a
    prime length tiled from a random offset: every tensor differs from every other, so a swapped or
    transposed weight in a conversion still shows, and the model builds in seconds."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models.single_file import sd15_configs
    from harness.models.tokenizer import clip_tokenizer

    cfg = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in sd15_configs().items()}
    with init_empty_weights():
        models = [UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"]),
                  CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))]
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1_000_003, generator=gen).mul_(std).to(dtype)
    for model in models:
        state = {}
        for k, v in model.state_dict().items():
            start = int(torch.randint(len(pool), (1,), generator=gen))
            reps = v.numel() // len(pool) + 2
            state[k] = pool.roll(-start).repeat(reps)[: v.numel()].view(v.shape).clone()
        model.load_state_dict(state, assign=True)
        model.eval()
    unet, vae, text = models
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config(sd15_configs()["scheduler"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
