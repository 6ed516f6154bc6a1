"""Datasets: the folder format, safe image decoding, the training loader, bucketing and splits."""
