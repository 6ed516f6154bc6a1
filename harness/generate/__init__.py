"""Generation: batched sampling, x/y/z grids, refinement, techniques and the denoising x-ray."""
