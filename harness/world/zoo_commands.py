"""``harness zoo build KIND --out DIR``: build a model zoo (KIND from :data:`ZOO_BUILDERS`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.errors import HarnessError
from harness.world.digits import build_digits_zoo

ZOO_PARTS = ("sd", "clip", "blip", "yolo")


def build_tiny(out: Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Random-weight tiny models: DIR/sd (diffusers), DIR/clip (open_clip), DIR/blip, DIR/yolo."""
    from harness.models.tiny import build_zoo

    return build_zoo(out, seed=seed, overwrite=overwrite)


# kind -> builder(out, *, seed, overwrite) -> out. The command lives in report, the last stage, so it may
# offer worlds that need every stage (the digits world trains an artifact estimator).
ZOO_BUILDERS: dict[str, Callable[..., Path]] = {"tiny": build_tiny, "digits": build_digits_zoo}


def build(kind: str, out, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Build zoo ``kind`` into ``out``; refuses to replace existing parts unless ``overwrite``."""
    if kind not in ZOO_BUILDERS:
        raise HarnessError(f"zoo kind {kind!r} is unknown; expected one of {', '.join(ZOO_BUILDERS)}")
    out = Path(out)
    existing = [str(out / p) for p in ZOO_PARTS if (out / p).exists()]
    if existing and not overwrite:  # checked up front so a refusal leaves nothing half-built
        raise HarnessError(f"{existing[0]}: already exists; refusing to overwrite it (pass --overwrite)")
    return ZOO_BUILDERS[kind](out, seed=seed, overwrite=overwrite)


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build a zoo into a folder",
                       description="Write DIR/sd, DIR/clip, DIR/blip, DIR/yolo.")
    b.add_argument("kind", choices=list(ZOO_BUILDERS), help="which zoo: " + ", ".join(ZOO_BUILDERS))
    b.add_argument("--out", required=True, metavar="DIR", help="output folder")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--overwrite", action="store_true", help="replace existing DIR/sd, DIR/clip, ...")


def run(args) -> int:
    out = build(args.kind, args.out, seed=args.seed, overwrite=args.overwrite)
    for part in ZOO_PARTS:
        if (out / part).exists():
            print(out / part)
    return 0
