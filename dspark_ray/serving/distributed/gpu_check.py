"""Served throughput and worker idle time of the distributed backend, on a GPU (or CPU as a smoke test).

    python -m dspark_ray.serving.distributed.gpu_check            # CUDA: bf16, nccl, workers on the GPU
    python -m dspark_ray.serving.distributed.gpu_check --cpu      # fp32, gloo, CPU workers (smoke test)

Builds two model instances through `build_distributed_engine` (speculative with the draft LM, or
with the DSpark drafter under `--drafter dspark`, and target-only), serves the same greedy prompts
through the `ModelServer` coordinator at each concurrency (configurations interleaved over `--rounds` rounds, medians reported), and prints: output tokens/s (speculative pipelined, speculative unpipelined,
target-only), the speedup, mean acceptance length, the busy/idle time of the target and draft
workers, bytes on the wire per generated token, and whether every speculative output equals the
target-only one. On one GPU the target group has one rank: its nccl process group is created and
checked with an all-reduce, but no collective crosses GPUs (`--tp N` needs N GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark_ray.config import DEFAULT_DRAFT_DIR, DEFAULT_DSPARK_DIR, DEFAULT_TARGET_DIR, REFERENCE_DIR, EngineConfig
from dspark_ray.engine.loading import load_tokenizer
from dspark_ray.serving.distributed.builder import DistributedEngine, build_distributed_engine
from dspark_ray.serving.distributed.placement import WorkerPlacement
from dspark_ray.serving.model_server import ModelServer
from dspark_ray.serving.protocol import CompletionRequest


@dataclass(frozen=True)
class Run:
    engine: str  # "speculative" | "target-only"
    pipelining: str  # on | off | auto
    concurrency: int
    num_requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    mean_acceptance_length: float
    target_idle_fraction: float
    draft_idle_fraction: float | None
    bytes_per_token: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="fp32 on CPU with gloo (a smoke test of the same path)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights and activations (default: bfloat16 on CUDA, float32 with --cpu)")
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET_DIR)
    parser.add_argument("--drafter", choices=["model", "dspark"], default="model",
                        help="drafter of the speculative engine")
    parser.add_argument("--draft", type=Path, default=None,
                        help="draft directory (default: the bundled draft LM, or DSpark drafter with --drafter dspark)")
    parser.add_argument("--prompts", type=Path, default=REFERENCE_DIR / "prompts" / "heldout.jsonl")
    parser.add_argument("--tp", type=int, default=1, help="target ranks (one GPU each on CUDA)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrent requests")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    on_gpu = torch.cuda.is_available() and not args.cpu
    if not ray.is_initialized():
        ray.init(include_dashboard=False, **({} if on_gpu else {"num_gpus": 0}))
    draft = args.draft or (DEFAULT_DSPARK_DIR if args.drafter == "dspark" else DEFAULT_DRAFT_DIR)
    common = dict(target=args.target, draft=draft, num_speculative_tokens=args.num_speculative_tokens,
                  dtype=args.dtype or ("bfloat16" if on_gpu else "float32"), device="cuda" if on_gpu else "cpu",
                  max_batch_size=64)
    placement = gpu_placement(args.tp) if on_gpu else WorkerPlacement(tp=args.tp)
    tokenizer = load_tokenizer(args.target)
    prompts = [tokenizer.encode(json.loads(line)["prompt"]) for line in args.prompts.read_text().splitlines()
               if line.strip()][: args.num_prompts]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"device {common['device']} {common['dtype']}, {placement.resolved_backend}, tp {args.tp}, drafter {args.drafter}, "
          f"{len(prompts)} prompts x {args.max_tokens} tokens, concurrency {concurrencies}", flush=True)

    engines = {}
    try:
        for name, drafter in (("target-only", "none"), ("speculative", args.drafter)):
            engines[name] = build_distributed_engine(EngineConfig(drafter=drafter, **common), placement)
            print(f"{name}: target ranks {[summary(info) for info in describe(engines[name][0])]}", flush=True)
            serve(*engines[name], prompts[:2], 8, 2)  # warm-up (allocators, kernels)
        runs, outputs = interleaved(engines, prompts, args.max_tokens, concurrencies, args.rounds)
    finally:
        for engine, _ in engines.values():
            engine.shutdown()
    identical = sum(a == b for a, b in zip(outputs["speculative"], outputs["target-only"]))
    print(f"greedy outputs identical to target-only: {identical}/{len(prompts)}")
    print_speedups(runs)
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(run) for run in runs], "identical": identical,
                                         "num_prompts": len(prompts), "rounds": args.rounds}, indent=2))
    return 0 if identical == len(prompts) else 1


def interleaved(engines: dict, prompts: list[list[int]], max_tokens: int, concurrencies: list[int], rounds: int
                ) -> tuple[list[Run], dict[str, list[list[int]]]]:
    """Every configuration once per round, rounds interleaved (load drifts); the median run of each."""
    configs = [("target-only", "off"), ("speculative", "on"), ("speculative", "off"), ("speculative", "auto")]
    samples: dict[tuple, list[Run]] = {}
    outputs: dict[str, list[list[int]]] = {}
    for concurrency in concurrencies:
        for _ in range(rounds):
            for name, mode in configs:
                engine, decode = engines[name]
                engine.pipelining = mode
                run, tokens = measure(engine, decode, name, prompts, max_tokens, concurrency)
                samples.setdefault((name, mode, concurrency), []).append(run)
                outputs.setdefault(name, tokens)
    runs = [sorted(runs, key=lambda run: run.tokens_per_s)[len(runs) // 2] for runs in samples.values()]
    for run in runs:
        print(format_run(run), flush=True)
    return runs, outputs


def gpu_placement(tp: int) -> WorkerPlacement:
    if tp == 1:  # one GPU shared: target and draft workers take half each
        return WorkerPlacement(tp=1, target_num_gpus_per_rank=0.5, draft_num_gpus=0.5, backend="nccl")
    return WorkerPlacement(tp=tp, target_num_gpus_per_rank=1, draft_num_gpus=0, backend="nccl")


def describe(engine: DistributedEngine) -> list[dict]:
    import ray

    return ray.get([actor.describe.remote() for actor in engine.target.actors])


def summary(info: dict) -> str:
    return f"{info['backend']}/{info['device']}/{info['dtype']}"


def measure(engine: DistributedEngine, decode, name: str, prompts: list[list[int]], max_tokens: int,
            concurrency: int) -> tuple[Run, list[list[int]]]:
    engine.worker_times(reset=True)
    engine.wire_stats(reset=True)
    start = time.perf_counter()
    finals = serve(engine, decode, prompts, max_tokens, concurrency)
    seconds = time.perf_counter() - start
    times, wire = engine.worker_times(), engine.wire_stats()
    tokens = [tokens for tokens, _ in finals]
    steps = sum(stats.num_steps for _, stats in finals if stats is not None)
    accepted = sum(stats.num_accepted_tokens for _, stats in finals if stats is not None)
    num_tokens = sum(len(t) for t in tokens)
    run = Run(name, engine.pipelining, concurrency, len(prompts), num_tokens, seconds, num_tokens / seconds,
              1 + accepted / max(1, steps), times["target"].idle_fraction,
              times["draft"].idle_fraction if "draft" in times else None, wire.bytes_per_generated_token)
    return run, tokens


def serve(engine: DistributedEngine, decode, prompts: list[list[int]], max_tokens: int, concurrency: int):
    """Every prompt through the ModelServer, at most `concurrency` in flight; (tokens, stats) per prompt."""

    async def scenario():
        server = ModelServer.on_thread(engine, decode)
        limit = asyncio.Semaphore(concurrency)

        async def one(index: int, prompt: list[int]):
            async with limit:
                tokens, stats = [], None
                request = CompletionRequest(f"r{index}", prompt, max_tokens=max_tokens, ignore_eos=True)
                async for delta in server.generate(request):
                    if delta.finish_reason == "error":
                        raise RuntimeError(delta.error)
                    tokens.extend(delta.token_ids)
                    stats = delta.stats or stats
                return tokens, stats

        try:
            return await asyncio.gather(*(one(i, prompt) for i, prompt in enumerate(prompts)))
        finally:
            server.shutdown()

    return asyncio.run(scenario())


def format_run(run: Run) -> str:
    draft = "-" if run.draft_idle_fraction is None else f"{run.draft_idle_fraction:.0%}"
    mode = {"on": "pipelined", "off": "unpipelined", "auto": "auto"}[run.pipelining]
    return (f"{run.engine:12s} {mode:11s} c={run.concurrency:<3d} {run.tokens_per_s:8.1f} tok/s  "
            f"acceptance {run.mean_acceptance_length:.2f}  idle target {run.target_idle_fraction:.0%} draft {draft}  "
            f"{run.bytes_per_token:.0f} B/token")


def print_speedups(runs: list[Run]) -> None:
    by_key = {(run.engine, run.pipelining, run.concurrency): run for run in runs}
    for (engine, mode, concurrency), run in by_key.items():
        if engine != "speculative":
            continue
        base = by_key.get(("target-only", "off", concurrency))
        unpipelined = by_key.get(("speculative", "off", concurrency))
        line = f"c={concurrency} {mode}: speculative/target-only {run.tokens_per_s / base.tokens_per_s:.2f}x"
        if mode != "off" and unpipelined:
            line += f", vs unpipelined {run.tokens_per_s / unpipelined.tokens_per_s:.2f}x"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
