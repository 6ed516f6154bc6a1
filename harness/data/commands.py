"""``harness data stats DIR``: inspect a dataset folder."""

from __future__ import annotations

import json

from harness.data.images import DEFAULT_MAX_PIXELS


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    stats = sub.add_parser("stats", help="counts, resolution/aspect histograms, caption lengths, unreadable files")
    stats.add_argument("dir", help="dataset folder (images + .txt sidecars or metadata.jsonl)")
    stats.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="refuse images with more pixels than this (default %(default)s)")
    stats.add_argument("--headers-only", action="store_true",
                       help="read image headers only (faster; misses truncated files)")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")


def run(args) -> int:
    from harness.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.dir, max_pixels=args.max_pixels, verify=not args.headers_only)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
