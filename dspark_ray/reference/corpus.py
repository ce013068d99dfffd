"""Training corpus for the reference models: the running Python's standard library source.

Files are listed in sorted order so the data order is reproducible; a held-out split (~3%) is
chosen by a stable hash of each file's path relative to the stdlib root, so it does not depend
on the file system, the Python hash seed or the number of files.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

HELDOUT_PERCENT = 3
# A copy of another interpreter's stdlib (e.g. to train on an accelerator machine): the folder
# holds the included files and a VERSION_FILE naming the interpreter they came from.
STDLIB_ENV = "DSPARK_REFERENCE_STDLIB"
VERSION_FILE = "STDLIB_VERSION"
# Directory names never used: tests, test data, vendored or third-party code, GUI test suites.
EXCLUDED_DIR_NAMES = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
EXCLUDED_PREFIXES = (
    "idlelib/test", "lib2to3/tests", "tkinter/test", "unittest/test", "ctypes/test",
)  # fmt: skip


def stdlib_root() -> Path:
    """The running interpreter's standard library, or a copy of one named by `$STDLIB_ENV`."""
    return Path(os.environ.get(STDLIB_ENV) or sysconfig.get_paths()["stdlib"])


def stdlib_version() -> str:
    """A short label of the standard library used, e.g. `CPython 3.11.7`."""
    label_file = stdlib_root() / VERSION_FILE
    if label_file.is_file():
        return label_file.read_text().strip()
    names = {"cpython": "CPython", "pypy": "PyPy"}
    name = names.get(sys.implementation.name, sys.implementation.name)
    return f"{name} {sys.version.split()[0]}"


def _is_excluded(relative: Path) -> bool:
    if any(part in EXCLUDED_DIR_NAMES for part in relative.parts[:-1]):
        return True
    return relative.as_posix().startswith(EXCLUDED_PREFIXES)


def list_source_files(root: Path | None = None) -> list[Path]:
    """All included `*.py` paths relative to `root`, sorted by their POSIX form."""
    root = root or stdlib_root()
    relatives = (path.relative_to(root) for path in root.rglob("*.py"))
    kept = [rel for rel in relatives if not _is_excluded(rel)]
    return sorted(kept, key=lambda rel: rel.as_posix())


def is_heldout(relative: Path) -> bool:
    """Whether a file belongs to the held-out split (stable across runs and machines)."""
    digest = hashlib.sha256(relative.as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, heldout) relative paths, each sorted."""
    files = list_source_files(root)
    return [f for f in files if not is_heldout(f)], [f for f in files if is_heldout(f)]


def read_text(relative: Path, root: Path | None = None) -> str | None:
    """The file's text, or None if it is not valid UTF-8 or is empty."""
    try:
        text = ((root or stdlib_root()) / relative).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def iter_texts(split: str, root: Path | None = None) -> Iterator[tuple[Path, str]]:
    """Yield `(relative_path, text)` for `split` in {"train", "heldout"}, in sorted order."""
    train, heldout = split_files(root)
    files = {"train": train, "heldout": heldout}[split]
    for relative in files:
        text = read_text(relative, root)
        if text is not None:
            yield relative, text


def export_copy(dest: Path) -> int:
    """Copy the included files and a version label to `dest` (for `$STDLIB_ENV`)."""
    root = stdlib_root()
    files = list_source_files(root)
    for relative in files:
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        (dest / relative).write_bytes((root / relative).read_bytes())
    (dest / VERSION_FILE).write_text(stdlib_version() + "\n")
    return len(files)
