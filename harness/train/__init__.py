"""Fine-tuning Stable Diffusion 1.5 on accelerate from YAML recipes.

Public API: ``train(recipe, resume=None, scorers=None) -> Path`` and ``train_from_file(path, overrides)``
(:mod:`harness.train.loop`), ``load_recipe(path, overrides) -> Recipe`` (:mod:`harness.train.recipe`),
``read_metrics(run_dir)`` (:mod:`harness.train.metrics_log`). Imported lazily so ``harness --help`` stays fast.
"""

_LAZY = {"train": "loop", "train_from_file": "loop", "TrainingDiverged": "optim", "load_recipe": "recipe",
         "Recipe": "recipe", "read_metrics": "metrics_log"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"harness.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'harness.train' has no attribute {name!r}")
