"""`dspark-ray deepspec ...`: the drafter-building toolkit, one subcommand per module.

Each module in `SUBCOMMANDS` exposes `add_parser(subparsers)` that registers its subcommand and
sets `func`, as the top-level CLI does.
"""

from __future__ import annotations

import importlib

SUBCOMMANDS = (
    "dspark_ray.deepspec.prepare",
    "dspark_ray.deepspec.train",
    "dspark_ray.deepspec.train_mtp",
    "dspark_ray.deepspec.calibrate",
    "dspark_ray.deepspec.evaluate",
    "dspark_ray.deepspec.pipeline",
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "deepspec", help="build drafters for a target: prepare data, train, calibrate, evaluate",
        description="DeepSpec: regenerate training data with the target, train DSpark drafters (and the "
                    "parallel-only ablation and a distilled draft LM), calibrate and evaluate them.")
    commands = parser.add_subparsers(dest="deepspec_command", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(commands)
