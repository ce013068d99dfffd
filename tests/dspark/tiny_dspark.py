"""Tiny DSpark drafters for tests: random-init, or trained for ~150 steps on the target's own greedy
continuations of the test prompts (tiny random targets are random functions, so the drafter learns
them by heart: drafts are then accepted often but not always, which is what the tests need).

This module knows nothing about the engine; it makes drafter directories."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from dspark_ray.deepspec.blocks import SequenceSampler
from dspark_ray.deepspec.loss import LossWeights
from dspark_ray.deepspec.records import Record
from dspark_ray.deepspec.target_pass import TargetPass
from dspark_ray.deepspec.train import TargetSource, dspark_step
from dspark_ray.dspark.config import DSparkConfig, spread_layer_ids
from dspark_ray.dspark.io import load_dspark, new_dspark_model, save_dspark
from dspark_ray.dspark.model import DSparkModel
from dspark_ray.dspark.signature import target_signature


@dataclass(frozen=True)
class TinyDSpark:
    model: DSparkModel
    directory: Path


def tiny_config(target: PreTrainedModel, head: str, block_size: int) -> DSparkConfig:
    signature = target_signature(target)
    return DSparkConfig(target=signature, target_layer_ids=spread_layer_ids(signature.num_layers),
                        block_size=block_size, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        sequential_head=head, head_rank=16)


# The prompts the engine tests decode (ragged lengths); the drafter is trained on their continuations.
PROMPTS = (
    (7,),
    (5, 6, 7, 8, 9, 10, 11, 12),
    (1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3),
    (20, 21, 20, 21, 20, 21),
    tuple(range(30, 47)),
)


@torch.no_grad()
def greedy_records(target: PreTrainedModel, prompts=PROMPTS, max_new: int = 48) -> list[Record]:
    records = []
    for index, prompt in enumerate(prompts):
        output = target.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                                 eos_token_id=None, pad_token_id=0)
        records.append(Record(f"r{index}", "", list(prompt), output[0, len(prompt):].tolist()))
    return records


def fit(model: DSparkModel, target: PreTrainedModel, steps: int = 150, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    sampler = SequenceSampler(greedy_records(target), 5, 80, generator)
    source = TargetSource(TargetPass(target, list(model.config.target_layer_ids)), None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        terms = dspark_step(model, source, sampler.next_batch(), 16, generator, LossWeights(), True)
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_tiny_dspark(target: PreTrainedModel, directory: Path, head: str = "gated", block_size: int = 4,
                      trained: bool = True, seed: int = 0) -> TinyDSpark:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = new_dspark_model(tiny_config(target, head, block_size), target)
    if trained:
        fit(model, target, seed=seed)
    save_dspark(model, directory)
    return TinyDSpark(load_dspark(directory, target), directory)
