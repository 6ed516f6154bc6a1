"""User-facing errors.

A :class:`HarnessError` is something the user can fix (a bad path, key or value). The CLI prints
its message as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """An error caused by user input; the message names the file/key/value and what was expected."""


class ConfigError(HarnessError, ValueError):
    """A recipe, suite or other YAML config is invalid."""


class CheckpointError(HarnessError):
    """A checkpoint cannot be found, read or recognised."""


class UnsafeCheckpointError(CheckpointError):
    """Loading the checkpoint would run pickled code and the user did not opt in."""
