"""Which target an artifact belongs to: `target.json`, written next to datasets and drafters.

A dataset (`deepspec prepare`), a DSpark drafter or a draft LM (`deepspec train`) records the target
directory it was made with, a fingerprint of that target's tokenizer (its vocabulary, merges and
added/special tokens: the tokenizer itself, not its size) and, where the target's weights were
loaded, their fingerprint (`dspark/signature.py`). Commands compare the record with the target they
are given and refuse a mismatch in one line; an artifact without a record (made before records
existed) gets a warning, or, if it holds a tokenizer of its own (an HF draft LM), is compared by it.

The target path is stored relative to the artifact when both sit in the same parent directory
(the bundled models, a run directory), so the pair can move together; otherwise absolute.
This module knows nothing about models: it loads tokenizers and reads and writes JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

RECORD_NAME = "target.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
logger = logging.getLogger(__name__)


class TargetMismatchError(ValueError):
    """An artifact was made for another target (another tokenizer or other weights)."""


class TargetRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(description="Target directory, relative to the artifact when they are siblings.")
    tokenizer_fingerprint: str = Field(description="sha256 of the target's tokenizer (tokenizer_fingerprint).")
    weights_fingerprint: str | None = Field(
        None, description="dspark.signature.target_fingerprint of the target's weights, where they were loaded.")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id), the BPE merges and the added/special tokens."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    merges = (backend.get("model") or {}).get("merges") or []
    parts = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "merges": [merge if isinstance(merge, str) else " ".join(merge) for merge in merges],
        "added": sorted([token["id"], token["content"], token["special"]] for token in backend.get("added_tokens", [])),
        "special": sorted(map(str, tokenizer.all_special_tokens)),
    }
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


@lru_cache(maxsize=16)
def _directory_fingerprint(resolved: str) -> str:
    from transformers import AutoTokenizer

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(resolved, local_files_only=True))


def directory_tokenizer_fingerprint(directory: Path | str) -> str:
    """The fingerprint of the tokenizer saved in `directory` (cached per directory)."""
    return _directory_fingerprint(str(Path(directory).resolve()))


def make_record(target_dir: Path | str, weights_fingerprint: str | None = None) -> TargetRecord:
    return TargetRecord(target=str(Path(target_dir).resolve()),
                        tokenizer_fingerprint=directory_tokenizer_fingerprint(target_dir),
                        weights_fingerprint=weights_fingerprint)


def write_record(directory: Path | str, record: TargetRecord) -> None:
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    target = Path(record.target).resolve()
    stored = os.path.relpath(target, directory) if target.parent == directory.parent else str(target)
    text = record.model_copy(update={"target": stored}).model_dump_json(indent=2)
    (directory / RECORD_NAME).write_text(text + "\n")


def read_record(directory: Path | str | None) -> TargetRecord | None:
    """The record in `directory` with its target made absolute; None without one."""
    if directory is None or not (Path(directory) / RECORD_NAME).is_file():
        return None
    record = TargetRecord.model_validate_json((Path(directory) / RECORD_NAME).read_text())
    return record.model_copy(update={"target": str((Path(directory) / record.target).resolve())})


def check_record(directory: Path | str, target_dir: Path | str, what: str,
                 weights_fingerprint: str | None = None) -> None:
    """Refuse (TargetMismatchError) an artifact made for another target; warn if it records none."""
    record = read_record(directory)
    expected = directory_tokenizer_fingerprint(target_dir)
    if record is None:
        if any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
            own = directory_tokenizer_fingerprint(directory)
            if own != expected:
                raise TargetMismatchError(
                    f"{what} {directory} has another tokenizer ({own[:12]}) than the target {target_dir} "
                    f"({expected[:12]}): its token ids mean other tokens")
            return
        logger.warning("warning: %s %s records no target (no %s); cannot check it belongs to %s",
                       what, directory, RECORD_NAME, target_dir)
        return
    other_weights = None not in (record.weights_fingerprint, weights_fingerprint) and \
        record.weights_fingerprint != weights_fingerprint
    if record.tokenizer_fingerprint != expected or other_weights:
        differs = "tokenizer" if record.tokenizer_fingerprint != expected else "weights"
        raise TargetMismatchError(
            f"{what} {directory} belongs to target {record.target} (tokenizer {record.tokenizer_fingerprint[:12]}), "
            f"not to {target_dir} (tokenizer {expected[:12]}; the {differs} differ): pass --target "
            f"{record.target}, or rebuild it for this target")
