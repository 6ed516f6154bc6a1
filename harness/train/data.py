"""What a run trains on: the training and validation splits of ``data.root``, the bucketed sampler, the
latent and text caches, and each epoch's micro-batches. Data order comes from (seed, epoch) and a
step's random draws from (seed, step, micro-batch, rank), so a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.train.cache import LatentCache, TextCache, default_cache_dir, encode_latent_dist, encode_text
from harness.train.models import Models
from harness.train.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Data:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    sampler: object
    steps_per_epoch: int
    reg_from: int | None = None  # items from this index on are data.reg_root's (prior preservation)
    reg_weight: float = 1.0


def _reg_items(recipe: Recipe, n_train: int, scan: dict) -> list:
    """data.reg_root's captioned images, repeated or cut to ``n_train`` (sd-scripts' balance of class
    images against instance images)."""
    from harness.data.folder import scan_dataset

    root = Path(recipe.data.reg_root)
    if not root.is_dir():
        raise HarnessError(f"data.reg_root = {root}: no such folder")
    items = [it for it in scan_dataset(root, split="train", **{**scan, "val_fraction": 0.0}).items if it.caption]
    if not items:
        raise HarnessError(f"data.reg_root = {root}: no captioned images (a .txt next to each image, e.g. "
                           "'a photo of a dog' for DreamBooth class images)")
    return [items[i % len(items)] for i in range(n_train)]


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
    reg_from = None
    if d.reg_root:
        index.items = captioned + _reg_items(recipe, len(captioned), scan)
        reg_from = len(captioned)
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
    return Data(train=train_ds, val=val_ds, sampler=sampler, steps_per_epoch=steps, reg_from=reg_from,
                reg_weight=d.reg_weight)


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


def collate(items: list[dict], reg_from: int | None = None, reg_weight: float = 1.0) -> dict:
    out = {"caption": [it["caption"] for it in items], "key": [it["key"] for it in items],
           "index": [it["index"] for it in items]}
    if reg_from is not None:  # each regularisation image's loss counts reg_weight times
        out["loss_weight"] = torch.tensor([reg_weight if it["index"] >= reg_from else 1.0 for it in items])
    for name in ("pixel_values", "dist"):
        if name in items[0]:
            out[name] = torch.stack([it[name] for it in items])
    return out


def epoch_loader(data: Data, dataset, epoch: int, start_step: int, grad_accum: int, num_workers: int):
    """This rank's micro-batches of ``epoch``, from optimizer step ``start_step`` on."""
    data.sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    batches = list(data.sampler)[start_step * grad_accum: data.steps_per_epoch * grad_accum]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       collate_fn=functools.partial(collate, reg_from=data.reg_from,
                                                                    reg_weight=data.reg_weight))


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
            hidden = encode_text(models.text_encoder, models.pipe.tokenizer, batch["caption"], models.clip_skip)
    return dist, hidden


def build_caches(recipe: Recipe, acc, models: Models, data: Data):
    """The latent and text caches the recipe turns on, and the training dataset to read (from the latent
    cache when it is on: every rank encodes its share, then all read all)."""
    cache_root = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_dir()
    text_cache = (TextCache(cache_root, models.text_encoder, models.pipe.tokenizer, models.clip_skip)
                  if recipe.data.cache_text else None)
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


def caption_encoder(models: Models, text_cache: TextCache | None):
    """Captions -> text-encoder hidden states without gradients, from the text cache when it is on."""
    def text_fn(captions):
        if text_cache is not None:
            return text_cache(captions)
        with torch.no_grad():
            return encode_text(models.text_encoder, models.pipe.tokenizer, captions, models.clip_skip)

    return text_fn
