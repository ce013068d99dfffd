"""`dspark-ray bench serve`: load a running OpenAI-compatible server, level by level of concurrency.

Each level keeps `concurrency` streaming completions in flight until `num_requests` have finished
and reports request throughput, output tokens/s, TTFT, TPOT (per request: time after the first
token / tokens after the first), ITL (per token: a chunk of n tokens counts n gaps of 1/n of its
wait), the acceptance length from the `dspark` vendor field, and errors. `--launch` starts a
local Ray Serve with two applications on the same models, speculative and a baseline (target-only,
drafter none; or with `--baseline engine-thread` the same engine stepped on a thread of its
replica), benchmarks both and prints them side by side; `--compare A.json B.json` does the same for
two earlier runs. `--compare-url URL` runs the same client, prompts, lengths and levels against
another OpenAI-compatible server (vLLM, say), repetitions interleaved, and reports `--url`'s figures
as ratios to the other's and, greedy, whether both servers returned the same tokens for every
request. Requests go to 127.0.0.1 only: this is a load generator for your own server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from dspark_ray.bench.repetitions import interleaved, median_levels
from dspark_ray.bench.side_by_side import OTHER, OURS, bench_side_by_side, format_identical
from dspark_ray.config import REFERENCE_DIR
from dspark_ray.serving.ports import free_port

if TYPE_CHECKING:  # the serving stack loads only with --launch
    from dspark_ray.serving.config import AppConfig

DEFAULT_PROMPTS = REFERENCE_DIR / "prompts" / "heldout.jsonl"
FALLBACK_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef list_files(path):",
                    "def quicksort(items):", "The quick brown fox", "def parse_args():"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    num_output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0  # until the last byte, or until the error
    status: int | None = None  # HTTP status (None: no response)
    retry_after: str | None = None  # the Retry-After header of an error response
    itl_s: list[float] = field(default_factory=list)
    num_steps: int = 0
    num_accepted_tokens: int = 0
    index: int = 0  # which request of the level (its prompt and max_tokens)
    token_ids: list[int] = field(default_factory=list)  # empty when the server sends none
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"mean": statistics.fmean(ordered) * 1e3, "p50": statistics.median(ordered) * 1e3, "p99": p99 * 1e3}


def level_report(concurrency: int, results: list[RequestResult], duration_s: float,
                 keep_outputs: bool = False) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    tokens = sum(r.num_output_tokens for r in done)
    steps = sum(r.num_steps for r in done)
    errors = [r.error for r in results if not r.ok]
    report = {
        "concurrency": concurrency,
        "num_requests": len(results),
        "num_errors": len(errors),
        "errors": sorted(set(errors))[:5],
        "duration_s": round(duration_s, 3),
        "request_throughput": len(done) / duration_s,
        "output_tokens_per_s": tokens / duration_s,
        "num_output_tokens": tokens,
        "ttft_ms": summarize([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": summarize([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": summarize([gap for r in done for gap in r.itl_s]),
        "mean_acceptance_length": 1 + sum(r.num_accepted_tokens for r in done) / steps if steps else None,
    }
    if keep_outputs:  # by request index; None for a failed request
        outputs: list[dict[str, Any] | None] = [None] * (1 + max((r.index for r in results), default=-1))
        for r in done:
            outputs[r.index] = {"token_ids": r.token_ids, "text": r.text}
        report["outputs"] = outputs
    return report


def check_local(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise ValueError(f"bench serve only sends requests to this machine (127.0.0.1), not {host!r}")


def completion_body(model: str, prompt: str, max_tokens: int, temperature: float, ignore_eos: bool) -> dict:
    """A streaming completion that reports usage and token ids (what the benchmarks time)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
            "return_token_ids": True}


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, temperature: float,
                      ignore_eos: bool, index: int = 0) -> RequestResult:
    """One streamed completion. Tokens are counted from the `token_ids` of each chunk (sent on
    `return_token_ids`, as dspark-ray and vLLM do); a server that sends none has each chunk with
    text count as one token, and its final `usage` gives the total."""
    body = completion_body(model, prompt, max_tokens, temperature, ignore_eos)
    result = RequestResult(ok=False, index=index)
    start = last = time.perf_counter()
    try:
        async with client.post(f"{url}/completions", json=body) as response:
            result.status = response.status
            if response.status != 200:
                result.retry_after = response.headers.get("Retry-After")
                error = json.loads(await response.read()).get("error", {})
                result.error = f"{response.status} {error.get('code')}"
                return result
            async for raw_line in response.content:  # SSE: one event per "data: " line
                line = raw_line.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    result.error = f"stream {event['error'].get('code')}"
                    return result
                now = time.perf_counter()
                for choice in event.get("choices", []):
                    token_ids, text = choice.get("token_ids") or [], choice.get("text") or ""
                    sends_ids = bool(token_ids or result.token_ids)  # then a text-only chunk is held-back text
                    num_tokens = len(token_ids) if sends_ids else int(bool(text))
                    result.token_ids.extend(token_ids)
                    result.text += text
                    if num_tokens and result.ttft_s is None:
                        result.ttft_s = now - start
                    elif num_tokens:
                        result.itl_s.extend([(now - last) / num_tokens] * num_tokens)
                    if num_tokens:
                        last = now
                    result.num_output_tokens += num_tokens
                if not result.token_ids and event.get("usage"):
                    result.num_output_tokens = event["usage"].get("completion_tokens", result.num_output_tokens)
                if "usage" in event and event.get("dspark"):
                    result.num_steps = event["dspark"]["num_steps"]
                    result.num_accepted_tokens = event["dspark"]["num_accepted_tokens"]
    except Exception as error:  # a dropped connection (or a non-JSON error body) is a counted error
        result.error = type(error).__name__
        return result
    finally:
        result.e2e_s = time.perf_counter() - start
    result.ok = True
    return result


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, num_requests: int,
                    max_tokens: list[int], temperature: float, ignore_eos: bool,
                    keep_outputs: bool = False) -> dict[str, Any]:
    """Request `index` sends prompt and max_tokens number `index` (both lists cycled). The client is
    aiohttp: it spends less CPU per streamed request than httpx, and on a machine the server
    shares that CPU is taken from the server (docs/design/reasons.md)."""
    import aiohttp

    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(num_requests):
        queue.put_nowait(index)
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600.0)) as client:
        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                results.append(await one_request(client, url, model, prompts[index % len(prompts)],
                                                 max_tokens[index % len(max_tokens)], temperature, ignore_eos,
                                                 index))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return level_report(concurrency, results, duration, keep_outputs)


def served_model(url: str, api_key: str | None = None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.get(f"{url}/models", headers=headers, timeout=30).json()["data"][0]["id"]


def bench(url: str, prompts: list[str], levels: list[int], num_requests: int, max_tokens: int,
          temperature: float, ignore_eos: bool, model: str | None = None, label: str | None = None,
          max_tokens_range: float = 0.0, keep_outputs: bool = False) -> dict[str, Any]:
    check_local(url)
    model = model or served_model(url)
    asyncio.run(run_level(url, model, prompts, 1, 1, [max_tokens], temperature, ignore_eos))  # warm-up
    lengths = request_lengths(max_tokens, max_tokens_range, num_requests)
    reports = []
    for concurrency in levels:
        report = asyncio.run(run_level(url, model, prompts, concurrency, num_requests, lengths,
                                       temperature, ignore_eos, keep_outputs))
        print(format_level(label or url, report), file=sys.stderr, flush=True)
        reports.append(report)
    return {"url": url, "model": model, "label": label, "max_tokens": max_tokens,
            "max_tokens_range": max_tokens_range, "temperature": temperature, "ignore_eos": ignore_eos,
            "levels": reports}


def request_lengths(max_tokens: int, spread: float, num_requests: int, seed: int = 0) -> list[int]:
    """max_tokens of each request: all `max_tokens`, or drawn uniformly from max_tokens x [1 - spread,
    1 + spread], the same draws on every run (both apps of `--launch`, every repetition)."""
    if spread == 0:
        return [max_tokens]
    draw = random.Random(seed)
    low, high = max(1, round(max_tokens * (1 - spread))), round(max_tokens * (1 + spread))
    return [draw.randint(low, high) for _ in range(num_requests)]


def format_level(label: str, r: dict[str, Any]) -> str:
    def ms(stats):
        return "-" if stats["mean"] is None else f"{stats['mean']:.1f}/{stats['p50']:.1f}/{stats['p99']:.1f}"
    acceptance = r["mean_acceptance_length"]
    return (f"{label}  c={r['concurrency']:<3} req/s={r['request_throughput']:.2f}  tok/s={r['output_tokens_per_s']:.1f}"
            f"  ttft(ms mean/p50/p99)={ms(r['ttft_ms'])}  tpot={ms(r['tpot_ms'])}  itl={ms(r['itl_ms'])}"
            f"  accept_len={'-' if acceptance is None else f'{acceptance:.2f}'}  errors={r['num_errors']}")


def compare(a: dict[str, Any], b: dict[str, Any], ratio_label: str = "ratio") -> str:
    """Side by side, ratios b / a (b: usually speculative, a: target-only)."""
    name_a, name_b = a.get("label") or a["url"], b.get("label") or b["url"]
    lines = [f"{'concurrency':>11}  {'tok/s ' + name_a:>24}  {'tok/s ' + name_b:>24}  {ratio_label:>6}  "
             f"{'tpot ms a':>9}  {'tpot ms b':>9}  {'ttft ms a':>9}  {'ttft ms b':>9}  {'accept_len b':>12}  "
             f"ratio per repetition"]
    levels_a = {r["concurrency"]: r for r in a["levels"]}
    for rb in b["levels"]:
        ra = levels_a.get(rb["concurrency"])
        if ra is None:
            continue
        ratio = rb["output_tokens_per_s"] / ra["output_tokens_per_s"] if ra["output_tokens_per_s"] else float("nan")
        tpot_a, tpot_b = ra["tpot_ms"]["mean"], rb["tpot_ms"]["mean"]
        ttft_a, ttft_b = (r.get("ttft_ms", {}).get("p50") for r in (ra, rb))
        accept = rb["mean_acceptance_length"]
        lines.append(f"{rb['concurrency']:>11}  {ra['output_tokens_per_s']:>24.1f}  {rb['output_tokens_per_s']:>24.1f}"
                     f"  {ratio:>{max(5, len(ratio_label) - 1)}.2f}x  {tpot_a or float('nan'):>9.1f}"
                     f"  {tpot_b or float('nan'):>9.1f}  {ttft_a or float('nan'):>9.1f}  {ttft_b or float('nan'):>9.1f}"
                     f"  {'-' if accept is None else f'{accept:.2f}':>12}  {repetition_ratios(ra, rb)}")
    return "\n".join(lines)


def repetition_ratios(a: dict[str, Any], b: dict[str, Any]) -> str:
    """b / a for each interleaved repetition, in run order ('-' for a single run): the first one
    on a fresh server is the cold one (a new replica's governor explores at each load level)."""
    runs_a, runs_b = a.get("output_tokens_per_s_runs", []), b.get("output_tokens_per_s_runs", [])
    if len(runs_a) < 2 or len(runs_a) != len(runs_b):
        return "-"
    return ", ".join(f"{rb / ra:.2f}" if ra else "nan" for ra, rb in zip(runs_a, runs_b))


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        path = DEFAULT_PROMPTS if DEFAULT_PROMPTS.is_file() else None
    if path is None:
        return list(FALLBACK_PROMPTS)
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class InProcessBaseline:
    """The served c=1 level's requests, one at a time, through an engine in this process (on the
    served engine process's CPUs, when it has its own)."""

    def __init__(self, engine_config, prompts: list[str], num_threads: int, cpus: tuple[int, ...] | None = None
                 ) -> None:
        import torch

        from dspark_ray.engine.factory import build_engine, load_models

        torch.set_num_threads(num_threads)
        models = load_models(engine_config)
        self.engine = build_engine(engine_config, models)
        self.prompt_ids = [models.tokenizer.encode(prompt) for prompt in prompts]
        self.cpus = cpus

    def run(self, num_requests: int, max_tokens: list[int], ignore_eos: bool) -> dict[str, Any]:
        from dspark_ray.engine.sequence import GenerationRequest

        requests = [GenerationRequest(self.prompt_ids[index % len(self.prompt_ids)],
                                      max_tokens=max_tokens[index % len(max_tokens)], ignore_eos=ignore_eos)
                    for index in range(num_requests)]
        with cpu_affinity(self.cpus):
            self.engine.generate(requests[:1])  # warm-up, like the served levels
            num_tokens, num_steps, num_accepted = 0, 0, 0
            start = time.perf_counter()
            for request in requests:
                (seq,) = self.engine.generate([request])
                num_tokens += len(seq.output_token_ids)
                num_steps += seq.stats.num_steps
                num_accepted += seq.stats.num_accepted_tokens
            duration = time.perf_counter() - start
        return {"concurrency": 1, "num_requests": num_requests, "duration_s": round(duration, 3),
                "output_tokens_per_s": num_tokens / duration, "num_output_tokens": num_tokens,
                "mean_acceptance_length": 1 + num_accepted / num_steps if num_steps else None}


@contextlib.contextmanager
def cpu_affinity(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Run the calling thread on `cpus` for a while (None: where it runs now)."""
    if cpus is None:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def served_vs_in_process(url: str, engine_config, prompts: list[str], args: argparse.Namespace,
                         repetitions: int = 3) -> dict[str, Any]:
    """Served c=1 and the in-process engine on the same requests, repetitions interleaved; medians."""
    baseline = InProcessBaseline(engine_config, prompts, args.threads or 1, args.engine_cpus)
    model = served_model(url)
    served, local = [], []
    lengths = request_lengths(args.max_tokens, args.max_tokens_range, args.num_requests)
    for side in interleaved(["served", "in-process"], repetitions):
        if side == "served":
            served.append(asyncio.run(run_level(url, model, prompts, 1, args.num_requests, lengths, 0.0,
                                                args.ignore_eos))["output_tokens_per_s"])
        else:
            local.append(baseline.run(args.num_requests, lengths, args.ignore_eos)["output_tokens_per_s"])
    return {"served_tokens_per_s": served, "in_process_tokens_per_s": local,
            "ratio": statistics.median(served) / statistics.median(local),
            "engine_cpus": list(args.engine_cpus) if args.engine_cpus is not None else None}


def format_served_vs_in_process(result: dict[str, Any]) -> str:
    served, local = (statistics.median(result[key]) for key in ("served_tokens_per_s", "in_process_tokens_per_s"))
    cpus = result.get("engine_cpus")
    where = f", both engines on CPUs {','.join(map(str, cpus))}" if cpus else ""
    return (f"served c=1 {served:.1f} tok/s vs in-process engine {local:.1f} tok/s (same requests one at a time"
            f"{where}, medians of {len(result['served_tokens_per_s'])} interleaved runs): {result['ratio']:.2f}x")


def baseline_app(kind: str, speculative: AppConfig) -> tuple[str, AppConfig]:
    """The app the speculative one is compared with, and its name: the target alone
    ('target-only'), the same engine stepped on a thread of its replica ('engine-thread'), or the
    same app with its router placed the other way ('other-router': colocate_router toggled), or
    with its prompts prefilled the other way ('other-prefill': fused_prefill toggled)."""
    if kind == "other-prefill":
        return "other_prefill", speculative.model_copy(update={"engine": speculative.engine.model_copy(
            update={"fused_prefill": not speculative.engine.fused_prefill})})
    if kind == "other-router":
        return "other_router", speculative.model_copy(update={"colocate_router": not speculative.colocate_router})
    if kind == "engine-thread":
        workers = speculative.workers.model_copy(update={"engine_process": False, "engine_cpus": None})
        return "engine_thread", speculative.model_copy(update={"workers": workers})
    return "target_only", speculative.model_copy(update={"engine": speculative.engine.model_copy(
        update={"drafter": "none"})})


def launch_and_compare(args: argparse.Namespace, prompts: list[str], levels: list[int]) -> dict[str, Any]:
    """Serve the speculative app and a baseline side by side on one local Serve; bench one after the other."""
    from ray import serve

    from dspark_ray.generate_cli import engine_config_from_args
    from dspark_ray.serving import serve_cli
    from dspark_ray.serving.app import build_app
    from dspark_ray.serving.config import AppConfig, ServeConfig, WorkersConfig

    engine = engine_config_from_args(args, max_batch_size=max(levels))
    capacity = {"max_ongoing_requests": max(levels), "max_queued_requests": max(levels),
                "torch_num_threads": args.threads or 1,
                # both apps share one GPU (Ray hides GPUs from actors that reserve none)
                "model_server_num_gpus": 0.5 if engine.device.startswith("cuda") else 0.0,
                "workers": WorkersConfig(engine_process=args.engine_process, engine_cpus=args.engine_cpus),
                "colocate_router": args.colocate_router}
    port = free_port()
    config = ServeConfig(http_port=port, grpc_port=None, app_name="speculative", route_prefix="/speculative",
                         app=AppConfig(engine=engine, **capacity))
    baseline_name, baseline = baseline_app(args.baseline, config.app)
    # Both apps stay resident (one idles while the other is measured): give Ray logical CPUs for both.
    serve_cli.start(config, "local", args.num_cpus or max(4, os.cpu_count() or 1), args.high_throughput,
                    args.haproxy, one_app=False)  # two apps, two route prefixes, one port: Serve's proxy routes
    try:
        serve.run(build_app(baseline), name=baseline_name, route_prefix=f"/{baseline_name}")
        repetitions: dict[str, list] = {baseline_name: [], "speculative": []}
        for name, reports in interleaved(repetitions.items(), args.repetitions):
            reports.append(bench(f"http://127.0.0.1:{port}/{name}/v1", prompts, levels, args.num_requests,
                                 args.max_tokens, args.temperature, args.ignore_eos, label=name,
                                 max_tokens_range=args.max_tokens_range))
        runs: dict[str, Any] = {name: median_levels(reports) for name, reports in repetitions.items()}
        runs["baseline"] = baseline_name
        if args.temperature == 0 and 1 in levels:  # greedy: both sides decode the same tokens
            runs["served_vs_in_process"] = served_vs_in_process(f"http://127.0.0.1:{port}/speculative/v1", engine,
                                                                prompts, args)
    finally:
        serve_cli.stop()
    return runs


def compare_with_url(args: argparse.Namespace, prompts: list[str], levels: list[int]) -> dict[str, Any]:
    """--url and --compare-url on the same requests (side_by_side)."""
    def bench_one(url: str, label: str) -> dict[str, Any]:
        return bench(url, prompts, levels, args.num_requests, args.max_tokens, args.temperature, args.ignore_eos,
                     args.model if label == OURS else None, label, args.max_tokens_range, keep_outputs=True)

    for url in (args.url, args.compare_url):
        check_local(url)
    return bench_side_by_side(bench_one, {OURS: args.url, OTHER: args.compare_url}, args.repetitions,
                              greedy=args.temperature == 0)


def add_parser(subparsers) -> None:
    from dspark_ray.generate_cli import add_engine_arguments
    from dspark_ray.serving.serve_cli import add_engine_process_argument, add_high_throughput_argument

    parser = subparsers.add_parser("serve", help="load an OpenAI-compatible server at several concurrencies",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL of the API (127.0.0.1 only)")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--num-requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="always decode max_tokens tokens")
    parser.add_argument("--max-tokens-range", type=float, default=0.0, metavar="R",
                        help="draw each request's max_tokens uniformly from max_tokens x [1-R, 1+R] (seeded: "
                             "the same lengths for both apps and every run); 0: all max_tokens. With "
                             "--ignore-eos and R=0 requests finish in lockstep, as real traffic does not")
    parser.add_argument("--prompts", type=Path, default=None, help='JSONL, one {"prompt": "..."} per line')
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                        help="print two earlier results side by side (ratios B / A) and exit")
    parser.add_argument("--compare-url", default=None, metavar="URL",
                        help="another OpenAI-compatible server (127.0.0.1 only), e.g. vLLM on the same model: the "
                             "same requests go to --url and URL, repetitions interleaved; prints --url's figures as "
                             "ratios to URL's and, greedy, whether both returned the same tokens")
    parser.add_argument("--launch", action="store_true",
                        help="start a local Ray Serve with speculative and target-only apps and compare them")
    parser.add_argument("--baseline", choices=["target-only", "engine-thread", "other-router", "other-prefill"],
                        default="target-only",
                        help="--launch: the app the speculative one is compared with: the target alone, the "
                             "same engine stepped on a thread of its replica instead of in a process of its own, "
                             "or the same app with --colocate-router or --fused-prefill toggled")
    parser.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of the local Ray (--launch)")
    parser.add_argument("--repetitions", type=int, default=1,
                        help="--launch, --compare-url: interleaved runs of both sides; each level reports the "
                             "median run")
    add_high_throughput_argument(parser)
    add_engine_process_argument(parser)
    add_engine_arguments(parser, threads_default="1 per engine")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            a, b = (json.loads(path.read_text()) for path in args.compare)
            print(compare(a, b))
            return 0
        levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
        if not levels or min(levels) < 1 or args.num_requests < 1 or args.repetitions < 1:
            raise ValueError("--concurrency needs levels >= 1, --num-requests and --repetitions >= 1")
        if not 0 <= args.max_tokens_range < 1:
            raise ValueError(f"--max-tokens-range must be in [0, 1), got {args.max_tokens_range}")
        prompts = read_prompts(args.prompts)
        if args.launch and args.compare_url:
            raise ValueError("--compare-url compares the server at --url; it does not combine with --launch")
        if args.compare_url:
            result = compare_with_url(args, prompts, levels)
            table = (compare(result[OTHER], result[OURS], ratio_label=f"{OURS}/{OTHER}") + "\n"
                     + format_identical(result["identical"]))
        elif args.launch:
            result = launch_and_compare(args, prompts, levels)
            table = compare(result[result["baseline"]], result["speculative"])
            if "served_vs_in_process" in result:
                table += "\n" + format_served_vs_in_process(result["served_vs_in_process"])
        else:
            result = bench(args.url, prompts, levels, args.num_requests, args.max_tokens, args.temperature,
                           args.ignore_eos, args.model, max_tokens_range=args.max_tokens_range)
            table = None
    except (ValueError, OSError) as error:
        print(f"dspark-ray bench serve: error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(table if table else text)
    return 0

