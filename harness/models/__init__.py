"""Checkpoints: loading (hub id, diffusers folder, single file), export, and the tiny model zoo."""
