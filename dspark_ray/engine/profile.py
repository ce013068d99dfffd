"""Measure the target's throughput profile SPS(B): verification steps per second when a step holds
B tokens in total, for DSpark's prefix scheduler.

A step of B tokens is `num_sequences` sequences, each with `context_length` tokens already cached
and verifying `B / num_sequences` tokens (its last committed token plus drafts), through the same
runner and ragged KV cache as the engine: one target forward, then the rollback the engine does
after verification. Measurement goes in rounds, one step of every B per round, so load that comes
and goes affects all B alike; the median step time over rounds is kept. Prefill is not timed.

The profile is JSON: `{"format": ..., "num_tokens": [...], "steps_per_second": [...], "points":
[...], "settings": {...}, "environment": {...}}`; `load_sps_curve` reads it back as an
`SpsCurve`. It is only valid for the hardware, dtype and thread count it was measured with.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from dspark_ray.core.scheduling import SpsCurve
from dspark_ray.engine.loading import context_limit, vocab_size
from dspark_ray.engine.runner import CausalLMRunner

PROFILE_FORMAT = "dspark-ray/sps-profile/v1"
DEFAULT_BATCH_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ProfileSettings:
    max_tokens_per_batch: int = 256
    tokens_per_sequence: int = 8  # verified per sequence (1 committed + 7 drafts); fewer when B is smaller
    context_length: int = 256  # cached tokens per sequence before the step (capped by the model's context)
    num_repeats: int = 9
    num_warmup: int = 2
    seed: int = 0


@dataclass(frozen=True)
class ProfilePoint:
    num_tokens: int
    num_sequences: int
    tokens_per_sequence: int
    step_time_s: float  # median
    steps_per_second: float


def default_profile_path(target_dir: Path) -> Path:
    """Next to the target directory: `<dir>_profile.json` (the bundled one: target_profile.json)."""
    target_dir = Path(target_dir)
    return target_dir.parent / f"{target_dir.name}_profile.json"


def batch_shapes(settings: ProfileSettings) -> list[tuple[int, int]]:
    """(num_sequences, tokens_per_sequence) for each measured B <= max_tokens_per_batch."""
    shapes = []
    for total in DEFAULT_BATCH_TOKENS:
        if total > settings.max_tokens_per_batch:
            break
        per_sequence = min(total, settings.tokens_per_sequence)
        shapes.append((total // per_sequence, per_sequence))
    if settings.max_tokens_per_batch not in DEFAULT_BATCH_TOKENS and settings.max_tokens_per_batch > 0:
        per_sequence = min(settings.max_tokens_per_batch, settings.tokens_per_sequence)
        shapes.append((settings.max_tokens_per_batch // per_sequence, per_sequence))
    return shapes


class _Batch:
    """`num_sequences` runner rows holding `context` cached tokens, and the tokens each step verifies."""

    def __init__(self, model: PreTrainedModel, num_sequences: int, tokens_per_sequence: int,
                 settings: ProfileSettings) -> None:
        context = min(settings.context_length, context_limit(model) - tokens_per_sequence - 1)
        if context < 1:
            raise ValueError(f"the model's context ({context_limit(model)}) is too short for the profile")
        generator = torch.Generator().manual_seed(settings.seed)
        vocab = vocab_size(model)
        contexts = torch.randint(1, vocab, (num_sequences, context), generator=generator).tolist()
        fed = torch.randint(1, vocab, (num_sequences, tokens_per_sequence), generator=generator).tolist()
        self.model = model
        self.num_sequences, self.tokens_per_sequence = num_sequences, tokens_per_sequence
        self.runner = CausalLMRunner(model)
        self.runner.add(dict(enumerate(contexts)))
        self.feed = dict(enumerate(fed))
        self.rollback = {row: contexts[row] + fed[row][:1] for row in range(num_sequences)}  # back to `context`

    @torch.no_grad()
    def time_step(self) -> float:
        """Seconds for one verification forward and the rollback after it."""
        _synchronize(self.model)
        start = time.perf_counter()
        self.runner.forward(self.feed)
        self.runner.sync(self.rollback)
        _synchronize(self.model)
        return time.perf_counter() - start


def measure_points(model: PreTrainedModel, settings: ProfileSettings, progress: bool = True) -> list[ProfilePoint]:
    """Rounds over every B in turn (so load that comes and goes hits all B alike); medians."""
    batches = [_Batch(model, rows, per_sequence, settings) for rows, per_sequence in batch_shapes(settings)]
    times: list[list[float]] = [[] for _ in batches]
    rounds = tqdm(range(settings.num_warmup + settings.num_repeats), desc="profiling SPS(B)", unit="round",
                  file=sys.stderr, disable=not progress)
    for round_index in rounds:
        for batch, batch_times in zip(batches, times):
            elapsed = batch.time_step()
            if round_index >= settings.num_warmup:
                batch_times.append(elapsed)
    points = []
    for batch, batch_times in zip(batches, times):
        step_time = statistics.median(batch_times)
        points.append(ProfilePoint(batch.num_sequences * batch.tokens_per_sequence, batch.num_sequences,
                                   batch.tokens_per_sequence, step_time, 1.0 / step_time))
    return points


def measure_profile(model: PreTrainedModel, settings: ProfileSettings, target: str = "",
                    progress: bool = True) -> dict:
    points = measure_points(model, settings, progress)
    parameter = next(model.parameters())
    return {
        "format": PROFILE_FORMAT,
        "target": target,
        "num_tokens": [point.num_tokens for point in points],
        "steps_per_second": [point.steps_per_second for point in points],
        "points": [asdict(point) for point in points],
        "settings": asdict(settings),
        "environment": {"device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch."),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "machine": platform.machine(), "processor": platform.processor()},
    }


def save_profile(profile: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2) + "\n")


def load_sps_curve(path: Path) -> SpsCurve:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the SPS profile {path}: {error}") from error
    if data.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path} is not a dspark-ray SPS profile (format {data.get('format')!r})")
    return SpsCurve.from_dict(data)


def _synchronize(model: PreTrainedModel) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
