"""Logging set-up for the CLI. Library code only calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os
import warnings


def setup(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname).1s %(name)s: %(message)s", force=True)
    # Third-party libraries are chatty at INFO; keep their warnings, drop their progress prose.
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx", "filelock", "h5py", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose < 2:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
