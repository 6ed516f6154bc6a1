"""The digits world's judges: a logistic-regression classifier on the real scans (is an image the
prompted digit, in any named style), an open_clip CLIP, a tiny BLIP captioner and a tiny YOLOv8
detector, each with the accuracy check the tests read. CLIP, BLIP and the detector see several inks
and papers with captions that name them, so they can recognise a style (red ink on cream paper) the
base model has never drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.world.digits_config import WorldConfig, _batches, _cosine, _progress
from harness.world.digits_data import (
    DIGIT_WORDS,
    IMAGE_SIZE,
    PLAIN,
    YOLO_SIZE,
    all_styles,
    caption,
    digit_canvases,
    load_ink,
    render_style,
    split_indices,
    styled_batch,
    to_uint8,
)


# ------------------------------------------------------------------------------------ classifier
def ink_features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any-style digit images -> 8x8 ink maps like sklearn's scans (features for the digit classifier).

    Ink is darker than paper for every named style, so inverted luminance, min-max normalised per
    image, recovers the stroke map whatever the colours."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.ndim == 4 and x.shape[-1] == 3:  # NHWC uint8
        x = x.permute(0, 3, 1, 2) / 255.0
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    small = F.adaptive_avg_pool2d(1 - lum, 8).flatten(1)
    lo, hi = small.min(1, keepdim=True).values, small.max(1, keepdim=True).values
    return ((small - lo) / (hi - lo).clamp_min(1e-3)).numpy()


def digit_classifier(seed: int = 0):
    """Logistic regression on the real scans' training split (the judge of "is it the prompted digit")."""
    from sklearn.linear_model import LogisticRegression

    ink, y = load_ink()
    train, _ = split_indices(len(y), seed)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(ink_features(render_style(ink[train], PLAIN)), y[train])
    return clf


def prompted_accuracy(images: torch.Tensor | np.ndarray, labels, classifier=None, seed: int = 0) -> float:
    """Fraction of images the real-digit classifier assigns to the prompted digit (chance: 10%)."""
    clf = classifier or digit_classifier(seed)
    return float(np.mean(clf.predict(ink_features(images)) == np.asarray(labels)))


# ------------------------------------------------------------------------------------------- CLIP
TINY_DIGITS_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


CLIP_TRAIN_CONTEXT = 24  # every caption fits; see _widen_context


def train_clip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray):
    """open_clip CLIP, contrastive over every (digit, style) caption: each image against all captions."""
    import open_clip

    styles = all_styles()
    texts = [caption(d, s) for s in styles for d in range(10)]  # index = style * 10 + digit
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts, context_length=CLIP_TRAIN_CONTEXT)
    torch.manual_seed(cfg.seed + 3)
    short = {**TINY_DIGITS_CLIP, "text_cfg": {**TINY_DIGITS_CLIP["text_cfg"], "context_length": CLIP_TRAIN_CONTEXT}}
    model = open_clip.CLIP(short["embed_dim"], short["vision_cfg"], short["text_cfg"])
    # One linear probe shared by both towers (digit and style logits) speeds up a from-scratch CLIP a
    # lot: it forces both embeddings to carry the digit early, in the same coordinates. Dropped after.
    probe = torch.nn.Linear(short["embed_dim"], 10 + len(styles))
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=cfg.lr, weight_decay=0.05, fused=True)
    text_digit = torch.arange(len(texts)) % 10
    text_style = torch.arange(len(texts)) // 10
    lr_at = _cosine(cfg.clip_steps, warmup=min(30, cfg.clip_steps // 10))
    gen = torch.Generator().manual_seed(cfg.seed + 30)
    bar = _progress(cfg.clip_steps, "clip")
    model.train()
    for step, idx in enumerate(_batches(len(ink), cfg.batch_size, cfg.clip_steps, gen)):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step)
        images, y, s = styled_batch(ink, labels, idx, styles, gen)
        images = images + 0.03 * torch.randn(images.shape, generator=gen)
        target = torch.from_numpy(s * 10 + y)
        img = F.normalize(model.encode_image((images - 0.5) / 0.5), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # image -> caption over all captions; caption -> image over the batch, where every image with
        # that caption is a positive (soft target)
        pos = (target[None, :] == torch.arange(len(texts))[:, None]).float()
        has = pos.sum(1) > 0
        t2i = -(F.log_softmax(logits.T[has], dim=1) * pos[has] / pos[has].sum(1, keepdim=True)).sum(1).mean()
        yt, st = torch.from_numpy(y), torch.from_numpy(s)
        aux = (_probe_loss(probe(img * 8), yt, st) + _probe_loss(probe(txt * 8), text_digit, text_style))
        loss = F.cross_entropy(logits, target) + t2i + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return _widen_context(model.eval(), cfg.seed)


def _probe_loss(logits: torch.Tensor, digit: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :10], digit) + F.cross_entropy(logits[:, 10:], style)


def _widen_context(short, seed: int):
    """The trained model at open_clip's standard 77-token context.

    Text attention is causal and pooled at the end-of-text token, so positions past the training
    context (padding after every caption's end) never reach the output: copying the trained weights
    into a 77-token model gives identical embeddings for any caption that fits, at a third of the
    training cost."""
    import open_clip

    torch.manual_seed(seed + 3)
    c = TINY_DIGITS_CLIP
    full = open_clip.CLIP(c["embed_dim"], c["vision_cfg"], c["text_cfg"])
    state = short.state_dict()
    pos = full.positional_embedding.detach().clone()
    pos[:CLIP_TRAIN_CONTEXT] = state["positional_embedding"]
    state["positional_embedding"] = pos
    full.load_state_dict(state)
    return full.eval()


@torch.no_grad()
def clip_caption_accuracy(model, images01: torch.Tensor, labels, styles_idx, styles) -> tuple[float, float]:
    """(digit accuracy, style accuracy) of zero-shot caption retrieval over all (digit, style) captions."""
    import open_clip

    texts = [caption(d, s) for s in styles for d in range(10)]
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts, context_length=model.positional_embedding.shape[0])
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    img = F.normalize(model.encode_image((images01 - 0.5) / 0.5), dim=-1)
    best = (img @ txt.T).argmax(1).numpy()
    return float(np.mean(best % 10 == np.asarray(labels))), float(np.mean(best // 10 == np.asarray(styles_idx)))


# ------------------------------------------------------------------------------------------- BLIP
def blip_words() -> list[str]:
    words = {w for s in all_styles() for d in range(10) for w in caption(d, s).split()}
    return sorted(words)


def train_blip(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray):
    """Tiny BLIP captioner trained with teacher forcing on styled digits and their captions."""
    from harness.models.tiny import build_blip_processor, build_tiny_blip

    styles = all_styles()
    processor = build_blip_processor(blip_words(), image_size=IMAGE_SIZE)
    model, processor = build_tiny_blip(cfg.seed + 4, processor=processor, image_size=IMAGE_SIZE)
    tok = processor.tokenizer
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed + 40)
    bar = _progress(cfg.blip_steps, "blip")
    model.train()
    for idx in _batches(len(ink), cfg.batch_size, cfg.blip_steps, gen):
        images, y, s = styled_batch(ink, labels, idx, styles, gen)
        enc = tok([caption(d, styles[k]) for d, k in zip(y, s)], padding=True, return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = tok.bos_token_id  # generation starts from [DEC], so training must too
        lab = ids.masked_fill(enc.attention_mask == 0, -100)
        out = model(pixel_values=(images - mean) / std, input_ids=ids, attention_mask=enc.attention_mask, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    bar.close()
    return model.eval(), processor


@torch.no_grad()
def blip_captions(model, processor, images01: torch.Tensor, max_new_tokens: int = 16) -> list[str]:
    pil = [__import__("PIL.Image", fromlist=["Image"]).fromarray(a) for a in to_uint8(images01)]
    inputs = processor(images=pil, return_tensors="pt")
    ids = model.generate(pixel_values=inputs.pixel_values, max_new_tokens=max_new_tokens, num_beams=1)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------- detector
def train_yolo(cfg: WorldConfig, ink: torch.Tensor, labels: np.ndarray, out: Path) -> Path:
    """The tiny YOLOv8 of harness.models.tiny trained in plain torch with ultralytics' own loss.

    ultralytics' trainer wants dataset folders, pickled checkpoints and (for AMP checks and plots)
    downloads; the model, the task-aligned assigner and the loss are what matter, so they are used
    directly."""
    from safetensors.torch import save_file
    from ultralytics.cfg import get_cfg

    from harness.models.tiny import build_tiny_yolo, load_yolo_dir

    build_tiny_yolo(out, seed=cfg.seed + 5, nc=10, names=list(DIGIT_WORDS))
    yolo = load_yolo_dir(out, seed=cfg.seed + 5)
    net = yolo.model
    net.args = get_cfg()
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=2 * cfg.lr, weight_decay=5e-4, fused=True)
    lr_at = _cosine(cfg.yolo_steps, warmup=min(30, cfg.yolo_steps // 10))
    gen = torch.Generator().manual_seed(cfg.seed + 50)
    bar = _progress(cfg.yolo_steps, "detector")
    for step in range(cfg.yolo_steps):
        for g in opt.param_groups:
            g["lr"] = 2 * cfg.lr * lr_at(step)
        images, targets = digit_canvases(ink, labels, cfg.batch_size // 2, gen)
        rows = [np.concatenate([np.full((len(t), 1), b, np.float32), t], 1) for b, t in enumerate(targets)]
        tgt = torch.from_numpy(np.concatenate(rows))
        batch = {"img": images, "batch_idx": tgt[:, 0], "cls": tgt[:, 1:2], "bboxes": tgt[:, 2:6]}
        loss, _items = net.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        bar.update(1)
    bar.close()
    net.eval()
    net.criterion = None
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    return out


def detector_accuracy(yolo, images01: torch.Tensor, labels, imgsz: int = YOLO_SIZE, conf: float = 0.25) -> float:
    """Fraction of single-digit images whose most confident box has the right class."""
    hits = 0
    results = yolo.predict(list(to_uint8(images01)[..., ::-1]), imgsz=imgsz, conf=conf, verbose=False)
    for r, y in zip(results, labels):
        if len(r.boxes):
            hits += int(r.boxes.cls[r.boxes.conf.argmax()].item() == int(y))
    return hits / len(labels)
