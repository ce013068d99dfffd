"""`dspark-ray bench load`: a drafter against the target alone under load, in-process (no Ray, no
HTTP), the engine-side counterpart of `bench serve --launch`.

At each concurrency level, an engine with `--drafter` and one without a drafter (sharing the loaded
target) run the same closed loop (`bench.admission.closed_loop`: `concurrency` greedy requests in
flight until `num_requests` have finished). Repetitions alternate between the two engines, and each
keeps its state between them, as a served replica does (its governor's verdicts included). The
report gives median output tokens/s, every run's figure, the ratio to the target alone, and whether
the outputs were identical to the target alone's, token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from dspark_ray.bench.admission import closed_loop
from dspark_ray.bench.repetitions import interleaved

BASELINE = "none"  # the target alone


def bench(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    import torch

    from dspark_ray.bench.serve import read_prompts, request_lengths
    from dspark_ray.engine.factory import build_engine, load_models
    from dspark_ray.engine.sequence import GenerationRequest
    from dspark_ray.generate_cli import engine_config_from_args

    torch.set_num_threads(args.threads or 1)
    config = engine_config_from_args(args, max_batch_size=max(levels))
    models = load_models(config)
    engines = {BASELINE: build_engine(config.model_copy(update={"drafter": BASELINE}), models),
               config.drafter: build_engine(config, models)}
    prompts = [models.tokenizer.encode(text) for text in read_prompts(args.prompts)]
    lengths = request_lengths(args.max_tokens, args.max_tokens_range, args.num_requests)
    requests = [GenerationRequest(prompts[index % len(prompts)], max_tokens=lengths[index % len(lengths)],
                                  ignore_eos=True) for index in range(args.num_requests)]
    return {"levels": [level_result(engines, requests, level, args.repetitions) for level in levels],
            "max_tokens": args.max_tokens, "max_tokens_range": args.max_tokens_range,
            "num_requests": args.num_requests, "drafter": config.drafter}


def level_result(engines: dict, requests: list, concurrency: int, repetitions: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, list] = {}
    for name, engine in interleaved(engines.items(), repetitions):
        tokens_per_s, outputs[name] = closed_loop(engine, requests, concurrency)
        runs[name].append(tokens_per_s)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {"concurrency": concurrency, "tokens_per_s_runs": runs, "tokens_per_s": medians,
            "ratio_to_target_only": {name: medians[name] / medians[BASELINE] for name in engines if name != BASELINE},
            "identical_to_target_only": {name: outputs[name] == outputs[BASELINE]
                                         for name in engines if name != BASELINE}}


def report(result: dict[str, Any]) -> str:
    lines = [f"{'concurrency':>11s} {'engine':8s} {'tok/s':>8s} {'runs':24s} {'ratio':>6s} identical"]
    for level in result["levels"]:
        for name, median in level["tokens_per_s"].items():
            runs = ", ".join(f"{value:.1f}" for value in level["tokens_per_s_runs"][name])
            ratio = level["ratio_to_target_only"].get(name)
            identical = level["identical_to_target_only"].get(name)
            lines.append(f"{level['concurrency']:11d} {name:8s} {median:8.1f} {runs:24s} "
                         f"{'-' if ratio is None else f'{ratio:.2f}x':>6s} {'-' if identical is None else identical}")
    return "\n".join(lines)


def all_identical(result: dict[str, Any]) -> bool:
    return all(all(level["identical_to_target_only"].values()) for level in result["levels"])


def add_parser(subparsers) -> None:
    from dspark_ray.generate_cli import add_engine_arguments

    parser = subparsers.add_parser("load", help="a drafter against the target alone under load, in-process",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="16", help="comma-separated concurrency levels")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per level and run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-tokens-range", type=float, default=0.0, metavar="R",
                        help="each request's max_tokens drawn from max_tokens x [1-R, 1+R] (seeded); 0: all "
                             "max_tokens, so requests finish in lockstep")
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved runs of every engine; medians")
    parser.add_argument("--prompts", type=Path, default=None,
                        help='JSONL, one {"prompt": "..."} per line (default: the bundled held-out prompts)')
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    add_engine_arguments(parser, threads_default="1")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
        if not levels or min(levels) < 1 or args.num_requests < 1 or args.repetitions < 1:
            raise ValueError("--concurrency needs levels >= 1, --num-requests and --repetitions >= 1")
        if not 0 <= args.max_tokens_range < 1:
            raise ValueError(f"--max-tokens-range must be in [0, 1), got {args.max_tokens_range}")
        if args.drafter == BASELINE:
            raise ValueError("--drafter none is the baseline itself: name a drafter (model, dspark, ngram)")
    except ValueError as error:
        print(f"dspark-ray bench load: error: {error}", file=sys.stderr)
        return 2
    result = bench(args, levels)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all_identical(result) else 1
