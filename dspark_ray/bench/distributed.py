"""`dspark-ray bench distributed`: the engine on worker actors (no HTTP), by step strategy.

One distributed engine per variant is built on a local Ray cluster (target worker + draft worker
each, all resident at once); then for every concurrency level the variants take turns, repetition
after repetition, each keeping `concurrency` greedy requests in flight until `num_requests` (at least 4 x
concurrency, so that the batch stays full and no tail of stragglers dominates) have finished. Reported per variant and level: median output tokens/s, mean acceptance length, and the
idle fraction of the target and draft workers (the number pipelining exists to drive down).

Variants: `target_only` (drafter none), `sequential` (propose, then verify), `pipelined` (across
requests: two micro-batches, one drafted while the other is verified, for no longer than the
target takes), `pipelined_untimed` (the same, drafting as far as the drafter goes), `look_ahead` (within a
request: the draft worker drafts past the proposal while the target verifies it), all three
drafting at every step; `load_aware` (sequential with the default load-aware drafting, which
drafts only at the batch sizes where it measured that drafting pays, and as far as it pays) and
`load_aware_pipelined` (pipelined steps under a governor of their own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from dspark_ray.bench.repetitions import interleaved, median_run

ALWAYS = {"load_aware_drafting": False}  # the step strategies are compared drafting at every step
VARIANTS = {  # name -> (EngineConfig overrides, WorkerPlacement fields)
    "target_only": ({"drafter": "none"}, {"pipelining": "off", "look_ahead": False}),
    "sequential": (ALWAYS, {"pipelining": "off", "look_ahead": False}),
    "pipelined": (ALWAYS, {"pipelining": "on", "look_ahead": False}),
    "pipelined_untimed": (ALWAYS, {"pipelining": "on", "look_ahead": False, "time_boxed_drafting": False}),
    "look_ahead": (ALWAYS, {"pipelining": "off", "look_ahead": True}),
    "load_aware": ({}, {"pipelining": "off", "look_ahead": False}),  # governed drafting
    "load_aware_pipelined": ({}, {"pipelining": "on", "look_ahead": False}),
}


def run_level(engine, requests: list, concurrency: int) -> dict[str, Any]:
    """Keep `concurrency` requests in flight until all have finished; tokens/s and acceptance."""
    pending = deque(requests)
    num_active = num_tokens = num_steps = num_accepted = 0
    engine.worker_times(reset=True)
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and num_active < concurrency:
            engine.add_request(pending.popleft())
            num_active += 1
        for seq in engine.step():
            num_active -= 1
            num_tokens += len(seq.output_token_ids)
            num_steps += seq.stats.num_steps
            num_accepted += seq.stats.num_accepted_tokens
    duration = time.perf_counter() - start
    idle = {role: times.idle_fraction for role, times in engine.worker_times().items()}
    return {"tokens_per_s": num_tokens / duration, "num_tokens": num_tokens,
            "mean_acceptance_length": 1 + num_accepted / num_steps if num_steps else None, "idle_fraction": idle}


def build_variants(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    from dspark_ray.generate_cli import engine_config_from_args
    from dspark_ray.serving.distributed import build_distributed_engine
    from dspark_ray.serving.distributed.placement import WorkerPlacement

    engines = {}
    for name in names:
        overrides, fields = VARIANTS[name]
        config = engine_config_from_args(args, max_batch_size=max(args.levels), **overrides)
        placement = WorkerPlacement(tp=args.tp, num_threads_per_worker=args.threads or 1, **fields)
        engines[name], _ = build_distributed_engine(config, placement)
        print(f"built {name}", file=sys.stderr, flush=True)
    return engines


def requests_for(args: argparse.Namespace) -> list:
    from dspark_ray.bench.serve import read_prompts
    from dspark_ray.config import resolve_target
    from dspark_ray.engine.loading import load_tokenizer
    from dspark_ray.engine.sequence import GenerationRequest

    tokenizer = load_tokenizer(resolve_target(args.target, [args.draft]))
    prompts = read_prompts(args.prompts)
    return [GenerationRequest(tokenizer.encode(prompts[index % len(prompts)]), max_tokens=args.max_tokens,
                              ignore_eos=True) for index in range(args.num_requests)]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    engines = build_variants(args, args.variants)
    requests = requests_for(args)
    results: dict[str, Any] = {"levels": {}}
    try:
        for engine in engines.values():  # warm-up
            run_level(engine, requests[:2], 2)
        for level in args.levels:
            runs: dict[str, list] = {name: [] for name in engines}
            level_requests = (requests * (1 + 4 * level // len(requests)))[: max(len(requests), 4 * level)]
            for name, engine in interleaved(engines.items(), args.repetitions):
                runs[name].append(run_level(engine, level_requests, level))
            results["levels"][level] = {name: median_run(reps, "tokens_per_s") for name, reps in runs.items()}
            print(format_level(level, results["levels"][level]), file=sys.stderr, flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
        ray.shutdown()
    return results


def format_level(level: int, variants: dict[str, Any]) -> str:
    lines = [f"concurrency {level}"]
    width = max(map(len, variants))
    for name, result in variants.items():
        ratios = "  ".join(f"{result['tokens_per_s'] / variants[base]['tokens_per_s']:.2f}x vs {base}"
                           for base in ("sequential", "target_only") if base in variants and base != name)
        idle = "  ".join(f"{role} idle {fraction:.0%}" for role, fraction in result["idle_fraction"].items())
        accept = result["mean_acceptance_length"]
        lines.append(f"  {name:{width}s} {result['tokens_per_s']:8.1f} tok/s  accept_len "
                     f"{'-' if accept is None else f'{accept:.2f}'}  {idle}  {ratios}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    from dspark_ray.generate_cli import add_engine_arguments

    parser = subparsers.add_parser("distributed", help="the engine on worker actors: step strategies compared",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--num-requests", type=int, default=16,
                        help="requests per level and repetition (at least 4 x the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved runs per variant; medians")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tp", type=int, default=1, help="target ranks (gloo on CPU)")
    parser.add_argument("--prompts", type=Path, default=None, help='JSONL, one {"prompt": "..."} per line')
    parser.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of the local Ray")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    add_engine_arguments(parser, threads_default="1 per worker")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if not args.levels or min(args.levels) < 1 or args.num_requests < 1 or args.repetitions < 1:
        print("dspark-ray bench distributed: error: --concurrency needs levels >= 1, --num-requests and "
              "--repetitions >= 1", file=sys.stderr)
        return 2
    result = bench(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
