"""``harness estimator build|train|score``."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="ratings table -> cached noisy-latent previews")
    b.add_argument("table", help="CSV/Parquet/JSONL ratings table (generic or AI-Horde layout)")
    b.add_argument("out", help="dataset folder")
    b.add_argument("--vae", required=True, help="SD pipeline folder (its vae/ and scheduler/) or VAE folder")
    b.add_argument("--images-root", help="folder image paths are relative to (default: the table's folder)")
    b.add_argument("--metadata", help="DiffusionDB metadata.parquet (prompt, seed, part folders)")
    b.add_argument("--scale", default="0,5", help="declared rating scale lo,hi (default 0,5)")
    b.add_argument("--min-ratings", type=int, default=3, help="per-rater tables: keep images with >= N ratings")
    b.add_argument("--missing", choices=("error", "drop"), default="error")
    b.add_argument("--duplicates", choices=("error", "median"), default="error")
    b.add_argument("--timesteps", default="0,200,400,600,800", help="'0,250,500' or 'start:stop:step'")
    b.add_argument("--draws", type=int, default=2, help="seeded noise draws per image and timestep")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--preview", choices=("linear", "vae"), default="linear")
    b.add_argument("--image-size", type=int, default=512, help="long side before encoding (aspect kept)")
    b.add_argument("--preview-size", type=int, default=64)
    b.add_argument("--device", default="cpu")

    t = sub.add_parser("train", help="train on a built dataset; fails if it does not beat the mean baseline")
    t.add_argument("dataset")
    t.add_argument("out")
    t.add_argument("--clip", default=None, help="open_clip name or local-dir:PATH (omit: conv features only)")
    t.add_argument("--clip-pretrained", default=None)
    t.add_argument("--head", choices=("regression", "ordinal", "classification"), default="ordinal")
    t.add_argument("--frozen-clip", action="store_true", help="do not fine-tune the CLIP image tower")
    t.add_argument("--no-conv", action="store_true", help="no learned conv features beside CLIP")
    t.add_argument("--scale", default="0,5")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--clip-lr", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--holdout", type=float, default=0.2)
    t.add_argument("--balance", choices=("loss", "sampler", "none"), default="loss")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")

    s = sub.add_parser("score", help="score image files with a trained estimator (JSON lines on stdout)")
    s.add_argument("estimator", help="estimator folder or .safetensors")
    s.add_argument("images", nargs="+")
    s.add_argument("--vae", default=None, help="VAE source (default: the one recorded at training)")
    s.add_argument("--device", default="cpu")


def _scale(text: str) -> tuple[float, float]:
    from harness.errors import HarnessError

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as e:
        raise HarnessError(f"--scale: expected 'lo,hi', got {text!r}") from e
    if not lo < hi:
        raise HarnessError(f"--scale: expected lo < hi, got {text!r}")
    return lo, hi


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        from harness.estimator.dataset import build_dataset
        from harness.estimator.table import read_ratings

        df = read_ratings(args.table, images_root=args.images_root, metadata=args.metadata, scale=_scale(args.scale),
                          min_ratings=args.min_ratings, missing=args.missing, duplicates=args.duplicates)
        out = build_dataset(df, args.out, vae_source=args.vae, timesteps=args.timesteps, draws=args.draws,
                            seed=args.seed, preview_kind=args.preview, image_size=args.image_size,
                            preview_size=args.preview_size, device=args.device)
        print(out)
        return 0
    if args.action == "train":
        from harness.estimator.train import format_table, train_estimator

        r = train_estimator(args.dataset, args.out, clip=args.clip, clip_pretrained=args.clip_pretrained,
                            head=args.head, finetune_clip=not args.frozen_clip, conv_features=not args.no_conv,
                            scale=_scale(args.scale), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            clip_lr=args.clip_lr, warmup=args.warmup, holdout=args.holdout, balance=args.balance,
                            seed=args.seed, device=args.device)
        print(format_table(r.metrics["per_timestep"]))
        print(r.path)
        return 0
    from harness.estimator.score import ArtifactEstimator

    est = ArtifactEstimator.load(args.estimator, vae_source=args.vae, device=args.device)
    for path, score in zip(args.images, est.score_files(args.images).tolist()):
        print(json.dumps({"image": path, "artifact_score": round(score, 4)}))
    return 0
