"""The `dspark-ray` command line: one subcommand per module, wired here."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `add_parser(subparsers)` that registers its subcommand and sets `func`.
SUBCOMMAND_MODULES = (
    "dspark_ray.generate_cli",
    "dspark_ray.bench.cli",
    "dspark_ray.reference.build",
    "dspark_ray.profile_cli",
    "dspark_ray.deepspec.cli",
    "dspark_ray.serving.serve_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspark-ray",
        description="Lossless speculative decoding: generate, benchmark, build models, serve.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
