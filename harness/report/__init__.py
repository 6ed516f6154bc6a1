"""Render an eval run folder: the HTML report, its plots, and run-vs-run comparison."""
