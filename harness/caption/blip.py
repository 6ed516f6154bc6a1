"""BLIP captioning of a dataset folder: batched, resumable, never overwriting a caption it was not
asked to.

Each caption is written the moment it exists (``.txt`` sidecars atomically; ``jsonl`` output to a
journal that is merged into metadata.jsonl atomically), so a killed run loses at most the batch in
flight and a rerun captions only what is left. Images that already have a caption are skipped;
images that cannot be read are counted with the reason and the run goes on.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.data.folder import Item, safe_join, scan_dataset, update_metadata
from harness.data.images import DEFAULT_MAX_PIXELS, open_rgb
from harness.errors import CheckpointError, HarnessError
from harness.io import append_jsonl, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

JOURNAL_NAME = ".harness-captions.jsonl"
OUTPUTS = ("txt", "jsonl")
# BLIP's WordPiece vocabulary averages a little over one token per English word; used to turn
# min_words into min_new_tokens when a caption comes out short.
TOKENS_PER_WORD = 1.4
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class CaptionSummary:
    root: Path
    output: str = "txt"
    dry_run: bool = False
    captioned: list[tuple[Path, str]] = field(default_factory=list)  # (image, caption written)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # already had a caption
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)
    short: list[Path] = field(default_factory=list)  # written, still under min_words after retries

    @property
    def distinct(self) -> int:
        """Different captions written: a model that says the same thing for every image trains nothing."""
        return len({text for _, text in self.captioned})

    def counts(self) -> dict[str, int]:
        return {"captioned": len(self.captioned), "distinct": self.distinct, "skipped": len(self.skipped),
                "failed": len(self.failed), "short": len(self.short)}

    def format(self) -> str:
        verb = "would caption" if self.dry_run else "captioned"
        lines = [f"{self.root}: {verb} {len(self.captioned)}, skipped {len(self.skipped)} (already captioned), "
                 f"failed {len(self.failed)}" + (f", {len(self.short)} still under min_words" if self.short else "")
                 + f"; {self.distinct} distinct caption(s)"]
        if len(self.captioned) >= 10 and self.distinct <= len(self.captioned) // 4:
            lines.append(f"  warning: only {self.distinct} distinct captions for {len(self.captioned)} images "
                         "(try --num-beams, sampling or --min-words)")
        lines += [f"  failed {p}: {why}" for p, why in self.failed]
        return "\n".join(lines)


def _is_blip2(config) -> bool:
    return getattr(config, "model_type", "") in ("blip-2", "blip_2", "blip2")


def load_captioner(model, processor=None, *, blip2: bool = False, device=None, dtype=None):
    """(model, processor) from a local folder, a hub id, or an already built model (+ its processor).

    The model class follows the checkpoint's config (BLIP or BLIP-2); ``blip2`` insists on BLIP-2."""
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
    )

    if isinstance(model, (str, os.PathLike)):
        src = _model_source(model)
        try:
            config = AutoConfig.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{src}: cannot load a BLIP config ({_first_line(e)})") from e
        if getattr(config, "model_type", "") not in ("blip", "blip-2", "blip_2"):
            raise CheckpointError(f"{src}: model_type {config.model_type!r} is not BLIP or BLIP-2")
        if blip2 and not _is_blip2(config):
            raise CheckpointError(f"{src}: blip2 requested but the checkpoint is model_type {config.model_type!r}")
        cls = Blip2ForConditionalGeneration if _is_blip2(config) else BlipForConditionalGeneration
        kwargs = {"dtype": dtype} if dtype is not None else {}
        try:
            model = cls.from_pretrained(src, **kwargs)
            processor = AutoProcessor.from_pretrained(_model_source(processor) if processor else src)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{src}: cannot load BLIP model or processor ({_first_line(e)})") from e
    elif processor is None:
        raise HarnessError("processor: required when model is an already loaded model object")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), processor


def _model_source(model) -> str:
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: expected a model folder with config.json (save_pretrained or a hub "
                                  "snapshot)")
        return str(path)
    text = str(model)
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such local folder, and not a hub id like 'Salesforce/blip-image-captioning-large'")
    return text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def clean_caption(text: str, *, max_words: int | None = None) -> str:
    words = text.split()
    if max_words is not None and len(words) > max_words:
        words = words[:max_words]
    return " ".join(words)


@torch.no_grad()
def generate_captions(model, processor, images: Sequence, *, prompt: str | None = None, num_beams: int = 3,
                      do_sample: bool = False, top_p: float = 0.9, temperature: float = 1.0,
                      repetition_penalty: float = 1.0, max_new_tokens: int = 40,
                      min_new_tokens: int | None = None) -> list[str]:
    """One ``generate`` call for a batch of PIL images; returns decoded, whitespace-normalised text."""
    kwargs = {"images": list(images), "return_tensors": "pt"}
    if prompt:
        kwargs["text"] = [prompt] * len(images)
    inputs = processor(**kwargs)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
    gen = {"num_beams": num_beams, "do_sample": do_sample, "repetition_penalty": repetition_penalty,
           "max_new_tokens": max_new_tokens}
    if do_sample:
        gen.update(top_p=top_p, temperature=temperature)
    if min_new_tokens:
        gen["min_new_tokens"] = min_new_tokens
        gen["max_new_tokens"] = max(max_new_tokens, min_new_tokens)
    out = model.generate(**inputs, **gen)
    texts = processor.batch_decode(out, skip_special_tokens=True)
    if _is_blip2(model.config) and prompt:
        # BLIP-2 (decoder-only LM) may echo the prompt; BLIP's conditional captions keep it by design.
        texts = [t[len(prompt):] if t.startswith(prompt) else t for t in texts]
    return [" ".join(t.split()) for t in texts]


def caption_images(model, processor, images: Sequence, *, min_words: int = 0, max_retries: int = 3,
                   max_new_tokens: int = 40, min_new_tokens: int | None = None, seed: int = 0, **gen) -> list[str]:
    """Captions for a batch; captions under ``min_words`` are regenerated with a growing
    ``min_new_tokens`` (and a fresh sampling seed) up to ``max_retries`` times, keeping the longest."""
    best = generate_captions(model, processor, images, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, **gen)
    for attempt in range(1, max_retries + 1):
        short = [i for i, c in enumerate(best) if count_words(c) < max(min_words, 1)]
        if not short:
            break
        need = math.ceil(max(min_words, 1) * TOKENS_PER_WORD * (1 + 0.5 * (attempt - 1)))
        torch.manual_seed(seed + attempt)
        again = generate_captions(model, processor, [images[i] for i in short],
                                  max_new_tokens=max(max_new_tokens, need + 8),
                                  min_new_tokens=max(need, min_new_tokens or 0), **gen)
        for i, text in zip(short, again):
            if count_words(text) > count_words(best[i]):
                best[i] = text
    return best


def _journal_merge(root: Path, *, dry_run: bool = False) -> int:
    """Fold a (possibly interrupted) run's journal into metadata.jsonl, then delete it."""
    journal = root / JOURNAL_NAME
    if not os.path.lexists(journal) or dry_run:
        return 0
    mode = journal.lstat().st_mode
    if not stat.S_ISREG(mode):  # a symlink, FIFO or device is not a journal this tool wrote
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        raise HarnessError(f"{journal}: {kind}; the caption journal must be a plain file (remove it)")
    root_real = root.resolve()
    by_replace: dict[bool, dict[Path, dict]] = {False: {}, True: {}}
    for rec in read_jsonl(journal):
        path, why = safe_join(root, rec.get("file_name"), root, root_real)
        if path is None or not isinstance(rec.get("text"), str):
            log.warning("%s: ignoring journal entry %r (%s)", journal, rec.get("file_name"), why or "no text")
            continue
        by_replace[bool(rec.get("replace"))][path] = {"text": rec["text"]}
    for replace, updates in by_replace.items():
        if updates:
            update_metadata(root, updates, replace=replace)
    journal.unlink()
    return sum(len(u) for u in by_replace.values())


def _todo(index, *, overwrite: bool, output: str, summary: CaptionSummary) -> list[Item]:
    todo = []
    for item in index.items:
        sidecar = item.path.with_suffix(".txt")
        if not overwrite and item.caption is not None:
            summary.skipped.append((item.path, f"already has a caption ({item.caption_source})"))
        elif not overwrite and output == "txt" and os.path.lexists(sidecar):
            summary.skipped.append((item.path, f"{sidecar.name} exists"))
        else:
            if output == "txt" and item.caption_source == "metadata":
                log.warning("%s: metadata.jsonl's text takes precedence over the .txt sidecar being written",
                            item.path)
            todo.append(item)
    return todo


def _validate(batch_size, num_beams, top_p, temperature, repetition_penalty, min_words, max_words, max_retries,
              output) -> None:
    checks = [("batch_size", batch_size, batch_size >= 1, ">= 1"), ("num_beams", num_beams, num_beams >= 1, ">= 1"),
              ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"), ("temperature", temperature, temperature > 0, "> 0"),
              ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0"),
              ("min_words", min_words, min_words >= 0, ">= 0"), ("max_retries", max_retries, max_retries >= 0, ">= 0"),
              ("max_words", max_words, max_words is None or max_words >= max(1, min_words), ">= min_words and >= 1"),
              ("output", output, output in OUTPUTS, f"one of {', '.join(OUTPUTS)}")]
    for name, value, ok, expected in checks:
        if not ok:
            raise HarnessError(f"{name}: expected {expected}, got {value!r}")


def caption_folder(root, *, model, processor=None, batch_size: int = 8, device=None, num_beams: int = 3,
                   do_sample: bool = False, top_p: float = 0.9, temperature: float = 1.0,
                   repetition_penalty: float = 1.0, min_words: int = 0, max_words: int | None = None,
                   max_retries: int = 3, max_new_tokens: int = 40, min_new_tokens: int | None = None,
                   prompt: str | None = None, prefix: str = "", suffix: str = "", overwrite: bool = False,
                   dry_run: bool = False, blip2: bool = False, output: str = "txt",
                   max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0, dtype=None,
                   progress: bool = True) -> CaptionSummary:
    """Caption every image in ``root`` that has no caption yet; see the module docstring."""
    _validate(batch_size, num_beams, top_p, temperature, repetition_penalty, min_words, max_words, max_retries,
              output)
    root = Path(root)
    # only jsonl runs read the journal: a txt run never opens it (whatever it has become)
    merged = _journal_merge(root.absolute(), dry_run=dry_run) if root.is_dir() and output == "jsonl" else 0
    if merged:
        log.info("%s: recovered %d caption(s) from an interrupted run", root, merged)
    index = scan_dataset(root, max_pixels=max_pixels, verify=False)
    summary = CaptionSummary(root=index.root, output=output, dry_run=dry_run, failed=list(index.skipped))
    todo = _todo(index, overwrite=overwrite, output=output, summary=summary)
    if not todo:
        return summary
    model, processor = load_captioner(model, processor, blip2=blip2, device=device, dtype=dtype)
    gen = {"prompt": prompt, "num_beams": num_beams, "do_sample": do_sample, "top_p": top_p,
           "temperature": temperature, "repetition_penalty": repetition_penalty}
    torch.manual_seed(seed)
    from harness.progress import Progress

    bar = Progress(total=len(todo), desc="captioning", unit="img", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            _caption_batch(batch, model, processor, gen, summary, root=index.root, min_words=min_words,
                           max_words=max_words, max_retries=max_retries, max_new_tokens=max_new_tokens,
                           min_new_tokens=min_new_tokens, prefix=prefix, suffix=suffix, overwrite=overwrite,
                           dry_run=dry_run, output=output, max_pixels=max_pixels, seed=seed + start)
            bar.update(len(batch))
    finally:
        bar.close()
        if output == "jsonl":
            _journal_merge(index.root, dry_run=dry_run)
    return summary


def _caption_batch(batch: list[Item], model, processor, gen: dict, summary: CaptionSummary, *, root: Path,
                   min_words, max_words, max_retries, max_new_tokens, min_new_tokens, prefix, suffix,
                   overwrite, dry_run, output, max_pixels, seed) -> None:
    images, ok = [], []
    for item in batch:
        try:
            images.append(open_rgb(item.path, max_pixels=max_pixels))
            ok.append(item)
        except HarnessError as e:
            summary.failed.append((item.path, str(e).removeprefix(f"{item.path}: ")))
    if not images:
        return
    kw = {"min_words": min_words, "max_retries": max_retries, "max_new_tokens": max_new_tokens,
          "min_new_tokens": min_new_tokens, "seed": seed, **gen}
    try:
        captions = caption_images(model, processor, images, **kw)
    except (RuntimeError, ValueError) as e:
        # A batch-level failure (e.g. out of memory) should not take the whole batch down: go one by one.
        log.warning("batch of %d failed (%s); retrying one image at a time", len(images), _first_line(e))
        captions = []
        for item, image in zip(ok, images):
            try:
                captions.append(caption_images(model, processor, [image], **kw)[0])
            except (RuntimeError, ValueError) as e1:
                captions.append(None)
                summary.failed.append((item.path, f"generation failed ({_first_line(e1)})"))
    for item, text in zip(ok, captions):
        if text is None:
            continue
        text = clean_caption(text, max_words=max_words)
        if not text:
            summary.failed.append((item.path, "the model produced an empty caption (try min_words)"))
            continue
        if count_words(text) < min_words:
            summary.short.append(item.path)
        final = with_affixes(text, prefix, suffix)
        if not dry_run:
            _write(item, final, root=root, overwrite=overwrite, output=output)
        summary.captioned.append((item.path, final))


def _core(affix: str) -> str:
    return affix.strip(" \t,.;:").lower()


def with_affixes(text: str, prefix: str, suffix: str) -> str:
    """``prefix + text + suffix``, leaving out an affix whose words the caption already has (a
    suffix ", red ink" on "... in red ink on cream paper" would say it twice)."""
    low = text.lower()
    pre = "" if _core(prefix) and _core(prefix) in low else prefix
    post = "" if _core(suffix) and _core(suffix) in low else suffix
    return f"{pre}{text}{post}"


def _write(item: Item, caption: str, *, root: Path, overwrite: bool, output: str) -> None:
    if output == "txt":
        atomic_write_text(item.path.with_suffix(".txt"), caption, overwrite=overwrite)
    else:
        append_jsonl(root / JOURNAL_NAME, {"file_name": item.rel, "text": caption, "replace": overwrite})
