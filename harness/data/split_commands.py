"""``harness split DIR --val 0.1 --seed 0``: write a hash-based train/val split into metadata.jsonl."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="dataset folder")
    parser.add_argument("--val", type=float, default=0.1, help="fraction held out for validation (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="reassign images that already have a split column (train/ val/ folders are kept)")
    parser.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")


def run(args) -> int:
    from harness.data.split import split_dataset

    report = split_dataset(args.dir, val=args.val, seed=args.seed, dry_run=args.dry_run, overwrite=args.overwrite)
    if args.dry_run:
        for rel, split in report.assigned:
            print(f"would set split={split}: {rel}")
    print(report.format())
    return 0
