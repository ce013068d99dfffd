"""Training prompts from the reference corpus's TRAIN split (never the held-out files).

Prompts have the shape of the held-out prompts: a `def`/`class` opening from its decorators to its
first body line, 100-400 characters, so the drafter trains on the continuations it will be asked
for. A seeded shuffle picks `num_prompts` of them across files; ids are `path:line`.
"""

from __future__ import annotations

import ast
import random

MIN_CHARS, MAX_CHARS = 100, 400
DefNode = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _openings(text: str) -> list[tuple[int, str]]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, DefNode) and node.body:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            opening = "".join(lines[first : node.body[0].lineno])
            if MIN_CHARS <= len(opening) <= MAX_CHARS:
                found.append((node.lineno, opening))
    return sorted(found)


def corpus_prompts(num_prompts: int, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
    """(id, prompt) pairs: `num_prompts` def/class openings of the corpus split, seeded order."""
    from dspark_ray.reference import corpus  # the reference models' corpus (Python stdlib source)

    candidates = [(f"{path.as_posix()}:{line}", opening)
                  for path, text in corpus.iter_texts(split) for line, opening in _openings(text)]
    random.Random(seed).shuffle(candidates)
    return candidates[:num_prompts]
