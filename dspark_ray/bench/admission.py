"""`dspark-ray bench admission`: what a new prompt costs a running batch, fused or prefilled apart
(both ways always run; `--fused-prefill` is ignored).

In-process, no Ray. For each way of admitting (`fused_prefill` on and off):
- step cost: a batch of `batch_size - 1` running greedy sequences; the median time of a plain
  step and of a step that also takes in one new prompt (its prefill and its first token);
- closed loop: `concurrency` greedy requests in flight until `num_requests` have finished, their
  lengths spread (`--max-tokens-range`) so that they finish, and new ones arrive, at different
  steps, as in served traffic; output tokens/s, and whether both ways produced the same tokens;
- with `--prompt-tokens`, the step cost of admitting a synthetic prompt of each given length.
Repetitions are interleaved between the two ways; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

from dspark_ray.bench.repetitions import interleaved

WAYS = {"fused": True, "apart": False}  # name -> EngineConfig.fused_prefill
FIRST_SYNTHETIC_TOKEN = 100  # synthetic prompts cycle through 64 token ids from here


def step_costs(engine, prompts: list[list[int]], batch_size: int, num_samples: int,
               admitted: list[list[int]] | None = None) -> dict[str, float]:
    """Median ms of a plain step and of a step that admits one prompt (of `admitted`, default
    `prompts`) beside `batch_size - 1` others running on `prompts`."""
    from dspark_ray.engine.sequence import GenerationRequest

    admitted = prompts if admitted is None else admitted
    long_enough = 2 * num_samples + 16
    running = [engine.add_request(GenerationRequest(prompts[index % len(prompts)], max_tokens=long_enough,
                                                    ignore_eos=True)) for index in range(batch_size - 1)]
    for _ in range(8):  # past the prefill and the first steps
        engine.step()
    plain, admitting = [], []
    for index in range(num_samples):
        plain.append(_timed(engine.step))
        engine.add_request(GenerationRequest(admitted[index % len(admitted)], max_tokens=1))  # leaves at once
        admitting.append(_timed(engine.step))
    engine.abort([seq.seq_id for seq in running])
    return {"plain_step_ms": statistics.median(plain) * 1e3, "admitting_step_ms": statistics.median(admitting) * 1e3}


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def closed_loop(engine, requests: list, concurrency: int) -> tuple[float, list[list[int]]]:
    """Output tokens/s with `concurrency` requests in flight; the outputs in request order."""
    pending, active, outputs = deque(enumerate(requests)), {}, [[] for _ in requests]
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and len(active) < concurrency:
            index, request = pending.popleft()
            active[engine.add_request(request).seq_id] = index
        for seq in engine.step():
            outputs[active.pop(seq.seq_id)] = seq.output_token_ids
    return sum(map(len, outputs)) / (time.perf_counter() - start), outputs


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dspark_ray.bench.serve import read_prompts, request_lengths
    from dspark_ray.engine.factory import build_engine, load_models
    from dspark_ray.engine.sequence import GenerationRequest
    from dspark_ray.generate_cli import engine_config_from_args

    torch.set_num_threads(args.threads or 1)
    config = engine_config_from_args(args, max_batch_size=max(args.batch_size, args.concurrency))
    models = load_models(config)
    prompts = [models.tokenizer.encode(text) for text in read_prompts(args.prompts)]
    engines = {way: build_engine(config.model_copy(update={"fused_prefill": fused}), models)
               for way, fused in WAYS.items()}
    lengths = request_lengths(args.max_tokens, args.max_tokens_range, args.num_requests)
    requests = [GenerationRequest(prompts[index % len(prompts)], max_tokens=lengths[index % len(lengths)],
                                  ignore_eos=True) for index in range(args.num_requests)]
    runs: dict[str, dict[str, list]] = {way: {"plain_step_ms": [], "admitting_step_ms": [], "tokens_per_s": []}
                                        for way in WAYS}
    outputs: dict[str, list] = {}
    for way, engine in interleaved(engines.items(), args.repetitions):
        for key, value in step_costs(engine, prompts, args.batch_size, args.num_samples).items():
            runs[way][key].append(value)
        tokens_per_s, outputs[way] = closed_loop(engine, requests, args.concurrency)
        runs[way]["tokens_per_s"].append(tokens_per_s)
    medians = {way: {key: statistics.median(values) for key, values in figures.items()} for way, figures in runs.items()}
    return {"runs": runs, "medians": medians, "identical_outputs": outputs["fused"] == outputs["apart"],
            "drafter": config.drafter, "batch_size": args.batch_size, "concurrency": args.concurrency,
            "by_prompt_tokens": [admission_by_length(engines, prompts, length, args) for length in args.prompt_tokens],
            "fused_prompt_limit": engines["fused"].verifier.fused_prompt_limit}


def admission_by_length(engines: dict, prompts: list[list[int]], length: int, args: argparse.Namespace
                        ) -> dict[str, Any]:
    """What admitting a prompt of `length` tokens adds to a step, each way (medians of the
    repetitions, interleaved)."""
    admitted = [[FIRST_SYNTHETIC_TOKEN + (sample + position) % 64 for position in range(length)]
                for sample in range(args.num_samples)]
    extra: dict[str, list[float]] = {way: [] for way in engines}
    for way, engine in interleaved(engines.items(), args.repetitions):
        costs = step_costs(engine, prompts, args.batch_size, args.num_samples, admitted)
        extra[way].append(costs["admitting_step_ms"] - costs["plain_step_ms"])
    return {"prompt_tokens": length, **{f"{way}_admission_ms": statistics.median(values)
                                        for way, values in extra.items()}}


def report(result: dict[str, Any]) -> str:
    fused, apart = result["medians"]["fused"], result["medians"]["apart"]
    lines = [f"{'way':8s} {'plain step ms':>14s} {'admitting step ms':>18s} {'admission ms':>13s} "
             f"{'closed loop tok/s':>18s}"]
    for way, figures in result["medians"].items():
        extra = figures["admitting_step_ms"] - figures["plain_step_ms"]
        lines.append(f"{way:8s} {figures['plain_step_ms']:14.1f} {figures['admitting_step_ms']:18.1f} {extra:13.1f} "
                     f"{figures['tokens_per_s']:18.1f}")
    lines.append(f"fused / apart, closed loop at c={result['concurrency']}: "
                 f"{fused['tokens_per_s'] / apart['tokens_per_s']:.2f}x; identical outputs: {result['identical_outputs']}")
    if result["by_prompt_tokens"]:
        lines.append(f"admission ms by prompt length (fused up to {result['fused_prompt_limit']} tokens):")
        lines.append(f"{'tokens':>8s} {'fused':>8s} {'apart':>8s}")
        lines.extend(f"{row['prompt_tokens']:8d} {row['fused_admission_ms']:8.1f} {row['apart_admission_ms']:8.1f}"
                     for row in result["by_prompt_tokens"])
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    from dspark_ray.generate_cli import add_engine_arguments

    parser = subparsers.add_parser("admission", help="a new prompt's cost to a running batch, fused or apart",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="sequences in the timed steps, the new one included")
    parser.add_argument("--num-samples", type=int, default=20, help="timed steps of each kind per repetition")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight in the closed loop")
    parser.add_argument("--num-requests", type=int, default=64, help="requests of the closed loop")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-tokens-range", type=float, default=0.5, metavar="R",
                        help="each request's max_tokens drawn from max_tokens x [1-R, 1+R] (seeded)")
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved runs of both ways; medians")
    parser.add_argument("--prompts", type=Path, default=None, help='JSONL, one {"prompt": "..."} per line')
    parser.add_argument("--prompt-tokens", type=_lengths, default=[], metavar="N,N,...",
                        help="also time admitting synthetic prompts of exactly these lengths, both ways")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    add_engine_arguments(parser, threads_default="1")
    parser.set_defaults(func=run)


def _lengths(text: str) -> list[int]:
    lengths = [int(length) for length in text.split(",") if length.strip()]
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"prompt lengths must be >= 1, got {text!r}")
    return lengths


def run(args: argparse.Namespace) -> int:
    result = bench(args)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["identical_outputs"] else 1
