"""``python -m harness.world.pack_world [WORLD_DIR]``: pack a built default world into harness/world/assets/
(run after a change to the world's builder, its config or version; the default folder is the cache's)."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.world.digits import WorldConfig, default_cache_dir
from harness.world.shipped import pack

if __name__ == "__main__":
    print(pack(Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache_dir(WorldConfig())))
