"""Run an eval suite: base vs candidates -> images, metrics with intervals, gates, results.json."""
