"""``accelerate launch -m harness.train RECIPE [key=value ...] [--print-recipe] [--resume latest|PATH]``."""

from __future__ import annotations

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
