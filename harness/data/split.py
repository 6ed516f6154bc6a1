"""``harness split``: write the hash-based validation split (``split_rule``) into metadata.jsonl."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.folder import scan_dataset, split_name, update_metadata
from harness.data.images import DEFAULT_MAX_PIXELS
from harness.data.split_rule import assign_split

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    root: Path
    counts: dict[str, int] = field(default_factory=dict)  # split -> images, after the change
    assigned: list[tuple[str, str]] = field(default_factory=list)  # (relative path, split) written
    kept: int = 0  # images that already had a split (column or train/ val/ folder)
    files: dict[Path, int] = field(default_factory=dict)  # metadata file -> rows changed
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    dry_run: bool = False

    def format(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        lines = [f"{self.root}: {counts}; {len(self.assigned)} newly assigned, {self.kept} already had a split, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  {verb} {n} row(s) in {path}" for path, n in self.files.items()]
        return "\n".join(lines)


def split_dataset(root, val: float = 0.1, seed: int = 0, dry_run: bool = False, *,
                  overwrite: bool = False, max_pixels: int | None = None) -> SplitReport:
    """Write a ``split`` column into metadata.jsonl for images that have none (``overwrite``: all
    images outside train/ and val/ folders). Captions and other columns are never touched."""
    assign_split("", val, seed)  # validates val
    index = scan_dataset(root, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, verify=False)
    report = SplitReport(root=index.root, skipped=index.skipped, dry_run=dry_run)
    updates = {}
    for item in index.items:
        from_folder = item.rel.split("/", 1)[0].lower() in ("train", "val", "validation", "valid", "test") \
            and "/" in item.rel
        explicit = item.split is not None
        if explicit and (from_folder or not overwrite):
            report.kept += 1
            split = item.split
        else:
            split = assign_split(item.rel, val, seed)
            if split_name(item.split) != split:
                updates[item.path] = {"split": split}
                report.assigned.append((item.rel, split))
        report.counts[split] = report.counts.get(split, 0) + 1
    report.files = update_metadata(index.root, updates, replace=overwrite, dry_run=dry_run)
    log.info("split %s: %s", index.root, report.counts)
    return report
