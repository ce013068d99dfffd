"""On-disk cache of the target's states for the training set: sharded safetensors, bfloat16.

Per record: `<id>/features` `[T, L*E]` (the chosen layers) and `<id>/final_hidden` `[T, E]` (the
lm_head input, from which training recomputes the target's logits). `index.json` maps ids to
shards and records the layers, so a cache made for other layers is refused. Writing is resumable
(ids already indexed are skipped); the expected size is printed before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dspark_ray.deepspec.records import Record
from dspark_ray.deepspec.target_pass import TargetPass

CACHE_DIR, INDEX_NAME = "features", "index.json"
STORAGE_DTYPE = torch.bfloat16


def _safe_key(record_id: str) -> str:
    return record_id.replace("/", "|")


class FeatureCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory / CACHE_DIR
        path = self.directory / INDEX_NAME
        self.index = json.loads(path.read_text()) if path.is_file() else {"layer_ids": None, "shards": {}}
        self._handles: dict[str, object] = {}

    def exists(self) -> bool:
        return bool(self.index["shards"])

    def check_layers(self, layer_ids: list[int]) -> None:
        cached = self.index["layer_ids"]
        if cached is not None and list(cached) != list(layer_ids):
            raise ValueError(f"{self.directory} caches target layers {cached}, not {list(layer_ids)}")

    def load(self, record_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [T, L*E], final_hidden [T, E]) float32 of one record."""
        shard = self.index["shards"][record_id]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
        key = _safe_key(record_id)
        return handle.get_tensor(f"{key}/features").float(), handle.get_tensor(f"{key}/final_hidden").float()

    def write(self, records: list[Record], target_pass: TargetPass, batch_size: int = 8,
              shard_tokens: int = 500_000) -> None:
        layer_ids = target_pass.capture.layer_ids
        self.check_layers(layer_ids)
        todo = [record for record in records if record.id not in self.index["shards"]]
        hidden = target_pass.target.get_input_embeddings().weight.shape[1]
        num_tokens = sum(len(record.token_ids) for record in todo)
        bytes_per_token = (len(layer_ids) + 1) * hidden * 2
        print(f"feature cache: {len(todo)} sequences, {num_tokens} tokens x {bytes_per_token} bytes "
              f"= {num_tokens * bytes_per_token / 2**20:.1f} MiB to write to {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index["layer_ids"] = list(layer_ids)
        shard: dict[str, torch.Tensor] = {}
        shard_ids: list[str] = []
        shard_size = 0
        for start in tqdm(range(0, len(todo), batch_size), desc="features", unit="batch"):
            chunk = todo[start : start + batch_size]
            lengths = torch.tensor([len(record.token_ids) for record in chunk])
            input_ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for row, record in enumerate(chunk):
                input_ids[row, : lengths[row]] = torch.tensor(record.token_ids)
            batch = target_pass(input_ids, lengths)
            for row, record in enumerate(chunk):
                key, length = _safe_key(record.id), int(lengths[row])
                shard[f"{key}/features"] = batch.features[row, :length].to(STORAGE_DTYPE).contiguous()
                shard[f"{key}/final_hidden"] = batch.final_hidden[row, :length].to(STORAGE_DTYPE).contiguous()
                shard_ids.append(record.id)
                shard_size += length
            if shard_size >= shard_tokens:
                self._flush(shard, shard_ids)
                shard, shard_ids, shard_size = {}, [], 0
        if shard:
            self._flush(shard, shard_ids)

    def _flush(self, shard: dict[str, torch.Tensor], shard_ids: list[str]) -> None:
        name = f"shard-{len(set(self.index['shards'].values())):05d}.safetensors"
        save_file(shard, str(self.directory / name))
        self.index["shards"].update({record_id: name for record_id in shard_ids})
        (self.directory / INDEX_NAME).write_text(json.dumps(self.index))
