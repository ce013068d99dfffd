"""Held-out coding-assistant prompts: openings of functions and classes from held-out files.

A prompt is the source of a top-level or nested `def`/`class` from its first line up to and
including its signature and the start of its docstring (or first body line), optionally preceded
by the decorators, trimmed to 100-400 characters. The model is asked to continue it.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

from dspark_ray.reference import corpus

MIN_CHARS, MAX_CHARS = 100, 400
NUM_PROMPTS = 64
DefNode = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _opening(lines: list[str], node: DefNode) -> str:
    """Lines from the decorators to the first body line (the docstring's first line)."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
    body_line = node.body[0].lineno  # 1-based: include that line
    return "".join(lines[first:body_line])


def _openings(text: str) -> Iterator[str]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    lines = text.splitlines(keepends=True)
    nodes = [n for n in ast.walk(tree) if isinstance(n, DefNode)]
    for node in sorted(nodes, key=lambda n: n.lineno):
        opening = _opening(lines, node)
        if MIN_CHARS <= len(opening) <= MAX_CHARS:
            yield opening


def heldout_prompts(num_prompts: int = NUM_PROMPTS) -> list[str]:
    """`num_prompts` openings spread over the held-out files (round-robin, in file order)."""
    per_file = [list(_openings(text)) for _, text in corpus.iter_texts("heldout")]
    per_file = [openings for openings in per_file if openings]
    prompts: list[str] = []
    for depth in range(max(map(len, per_file), default=0)):
        for openings in per_file:
            if depth < len(openings) and len(prompts) < num_prompts:
                prompts.append(openings[depth])
    return prompts


def write_prompts(path: Path, num_prompts: int = NUM_PROMPTS) -> int:
    """Write `{"prompt": ...}` lines to `path`; return how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = heldout_prompts(num_prompts)
    lines = (json.dumps({"prompt": prompt}) + "\n" for prompt in prompts)
    path.write_text("".join(lines), encoding="utf-8")
    return len(prompts)
