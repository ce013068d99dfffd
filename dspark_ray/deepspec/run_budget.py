"""How much of a `deepspec run` budget calibrate and eval will take, so the trainings get the rest.

Before the trainings, `probe_seconds_per_prompt` times target-only greedy decoding of a few eval
prompts at batch size 1 (the way eval decodes) on this machine, under its current load. The
reserve then counts, in those prompt-decodes: each calibration prompt once, and in eval the
target-only row once plus each drafter row `DRAFTER_ROW_COST` times (a speculative row runs the
drafter as well as the target; the trained drafters do not exist yet, so this is an allowance, not
a measurement), all times `SAFETY`. It does not know how the load of a shared machine will change
after the probe; the run reports the estimate next to what calibrate and eval really took.
"""

from __future__ import annotations

import time
from pathlib import Path

DRAFTER_ROW_COST = 1.5  # prompt-decodes per eval prompt of one speculative row
SAFETY = 1.25
PROBE_PROMPTS = 3


def probe_seconds_per_prompt(target: Path, prompts: list[str], max_tokens: int, threads: int | None) -> float:
    """Wall seconds per prompt of target-only greedy decoding at batch size 1 (after a warm-up)."""
    import torch

    from dspark_ray.config import EngineConfig
    from dspark_ray.core.sampling import SamplingParams
    from dspark_ray.deepspec.acceptance import run_recorded
    from dspark_ray.engine.factory import build_engine, load_models
    from dspark_ray.engine.sequence import GenerationRequest

    if threads:
        torch.set_num_threads(threads)
    config = EngineConfig(target=target, drafter="none", draft=None, max_batch_size=1,
                          adaptive_speculation="off", load_aware_drafting=False)
    models = load_models(config)
    requests = [GenerationRequest(models.tokenizer.encode(prompt), SamplingParams(temperature=0.0), max_tokens)
                for prompt in prompts[:PROBE_PROMPTS]]
    run_recorded(build_engine(config, models), requests[:1])  # warm-up
    start = time.perf_counter()
    for request in requests:
        run_recorded(build_engine(config, models), [request])
    return (time.perf_counter() - start) / len(requests)


def reserve_seconds(seconds_per_prompt: float, calibration_prompts: int, eval_prompts: int,
                    num_drafters: int) -> float:
    """Estimated wall seconds of calibrate plus eval."""
    decodes = calibration_prompts + eval_prompts * (1 + num_drafters * DRAFTER_ROW_COST)
    return SAFETY * seconds_per_prompt * decodes
