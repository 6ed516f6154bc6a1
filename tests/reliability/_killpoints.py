"""Kill points for subprocess fault injection: ``install("KIND:N")`` patches one harness function so
that the process SIGKILLs itself there, the way a pre-empted or OOM-killed job dies (no cleanup,
no ``finally``, no atexit). Used by ``_rel_helpers.run_killed``.

- ``latent-put:N``  during the N-th latent-cache entry write (half the bytes written, then killed)
- ``ckpt-write:S``  while the checkpoint of step S is being written (state saved, manifest not yet)
- ``step:S``        during optimizer step S (after the forward pass, before backward/optimizer.step)
- ``png:N``         during the N-th generated PNG write (half the bytes written, then killed)
- ``features:N``    during the N-th feature-cache .npz write (half the bytes written, then killed)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _torn_write(real_atomic_write, path, data: bytes) -> None:
    """Start a real atomic write and die half way through it."""

    def half(f):
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    real_atomic_write(path, half)


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    n = int(arg)
    count = [0]
    from harness import io

    if kind == "latent-put":
        from harness.train import cache

        real = cache.atomic_write_bytes

        def put(path, data, **kw):
            if "latents" in Path(path).parts:
                count[0] += 1
                if count[0] == n:
                    _torn_write(io.atomic_write, path, data)
            return real(path, data, **kw)

        cache.atomic_write_bytes = put
    elif kind == "ckpt-write":
        from harness.train import checkpoint

        real_manifest = checkpoint.write_manifest

        def manifest(path):
            if checkpoint.checkpoint_name(n) in Path(path).name:
                die()
            return real_manifest(path)

        checkpoint.write_manifest = manifest
    elif kind == "step":
        from harness.train import loop

        real_check = loop._check_finite

        def check(acc, loss, step, *a, **kw):
            if step + 1 == n:
                die()
            return real_check(acc, loss, step, *a, **kw)

        loop._check_finite = check
    elif kind == "png":
        from harness.generate import batch

        real_bytes = batch.atomic_write_bytes

        def write_png(path, data, **kw):
            if str(path).endswith(".png"):
                count[0] += 1
                if count[0] == n:
                    _torn_write(io.atomic_write, path, data)
            return real_bytes(path, data, **kw)

        batch.atomic_write_bytes = write_png
    elif kind == "features":
        from harness.metrics import features

        real_write = features.atomic_write

        def write(path, fn, **kw):
            if str(path).endswith(".npz"):
                count[0] += 1
                if count[0] == n:
                    import io as _io

                    buf = _io.BytesIO()
                    fn(buf)
                    _torn_write(io.atomic_write, path, buf.getvalue())
            return real_write(path, fn, **kw)

        features.atomic_write = write
    else:
        raise ValueError(f"unknown kill point {point!r}")
