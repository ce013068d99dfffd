"""What every DeepSpec subcommand does around its work: the torch thread count, and input errors
as one line and exit status 2 instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def run_reporting_errors(command: str, args: argparse.Namespace, work: Callable[[], T]) -> T | None:
    """`work()` under `args.threads` torch threads; a ValueError or OSError (bad input, an artifact
    of another target, a missing file) is printed as one line and gives None."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return work()
    except (ValueError, OSError) as error:
        print(f"dspark-ray deepspec {command}: error: {error}", file=sys.stderr)
        return None
