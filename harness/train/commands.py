"""``harness train RECIPE [key=value ...] [--print-recipe] [--resume latest|PATH]``.

The same arguments work under ``accelerate launch -m harness.train RECIPE ...`` (see ``__main__``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/; 'extends:' another recipe to change a few keys)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override any recipe key, dotted for nested ones (train.lr=1e-6 lora.enabled=true)")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the fully resolved recipe (defaults filled in) and exit")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest intact checkpoint of output_dir, or from a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    from harness.train.recipe import load_recipe, recipe_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(recipe_yaml(recipe), end="")
        return 0
    import logging

    from harness.train.loop import train

    if logging.getLogger().level > logging.DEBUG:  # accelerate narrates every save at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    final = train(recipe, resume=args.resume)
    print(final)
    return 0
