"""The training set written by `prepare`: one JSON line per regenerated answer, append-only.

A record holds the prompt, the target's answer and their token ids under the target's tokenizer.
Lines are appended as answers arrive, so an interrupted run resumes by skipping the ids already
present (a truncated last line, from a kill mid-write, is ignored and redone).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA_NAME = "data.jsonl"


@dataclass(frozen=True)
class Record:
    id: str
    prompt: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str = ""  # the answer's text (what an endpoint returned, or the decoded answer)
    meta: dict = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


def read_records(path: Path) -> list[Record]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(Record(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue  # a partial last line from an interrupted run
    return records


def append_records(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(asdict(record)) + "\n")
        handle.flush()


def read_prompt_file(path: Path) -> list[tuple[str, str]]:
    """(id, prompt) pairs from a JSONL of {"prompt": ...} (an optional "id" is kept, else the line number)."""
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": \"...\"}}")
        prompts.append((str(item.get("id", f"{path.stem}:{number}")), item["prompt"]))
    return prompts
