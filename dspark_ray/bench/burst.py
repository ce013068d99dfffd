"""`dspark-ray bench burst`: many requests at once against a running server, and how overload is answered.

All `--num-requests` streaming completions leave together: one connection each is opened first,
then every request is written in one loop (`burst_client`), and each one's clock starts when its
bytes leave. It reports how many got each status, how soon the rejected ones were answered
(p50/p99, ms, from sending the request to its whole rejection), whether every rejection was a 429
or 503 with Retry-After and an OpenAI error body, and the admitted ones' time to first token.
Requests go to 127.0.0.1 only. It does not know the server's limits: run it with more requests
than those.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from dspark_ray.bench.burst_client import request_bytes, send_together
from dspark_ray.bench.serve import RequestResult, check_local, completion_body, served_model, summarize

OVERLOAD_STATUSES = (429, 503)


TIMEOUT_S = 600.0


async def burst(url: str, model: str, num_requests: int, max_tokens: int, api_key: str | None = None
                ) -> tuple[list[RequestResult], float]:
    """Results of `num_requests` greedy streams sent together, and the seconds their sends spanned."""
    requests = [request_bytes(f"{url}/completions", completion_body(model, f"def burst_{index}(", max_tokens,
                                                                    0.0, True), api_key)
                for index in range(num_requests)]
    return await send_together(url, requests, TIMEOUT_S)


def report(results: list[RequestResult], sent_within_s: float | None = None) -> dict[str, Any]:
    rejected = [r for r in results if r.status in OVERLOAD_STATUSES]
    admitted = [r for r in results if r.ok]
    return {
        "num_requests": len(results),
        "sent_within_ms": None if sent_within_s is None else sent_within_s * 1e3,
        "statuses": dict(Counter(str(r.status) for r in results)),
        "num_admitted": len(admitted),
        "num_rejected": len(rejected),
        "rejected_answered_ms": summarize([r.e2e_s for r in rejected]),
        "rejected_without_retry_after": sum(r.retry_after is None for r in rejected),
        "rejected_without_openai_body": sum(not (r.error or "").startswith(str(r.status)) for r in rejected),
        "admitted_ttft_ms": summarize([r.ttft_s for r in admitted if r.ttft_s is not None]),
        "other_errors": sorted({r.error for r in results if not r.ok and r not in rejected})[:5],
    }


def format_report(r: dict[str, Any]) -> str:
    def ms(stats):
        return "-" if stats["p50"] is None else f"p50 {stats['p50']:.1f} / p99 {stats['p99']:.1f} ms"
    spread = "" if r["sent_within_ms"] is None else f" (sent within {r['sent_within_ms']:.1f} ms)"
    return (f"{r['num_requests']} requests at once{spread}: statuses {r['statuses']}\n"
            f"  rejected {r['num_rejected']}: answered {ms(r['rejected_answered_ms'])}; "
            f"without Retry-After {r['rejected_without_retry_after']}, "
            f"without an OpenAI error body {r['rejected_without_openai_body']}\n"
            f"  admitted {r['num_admitted']}: time to first token {ms(r['admitted_ttft_ms'])}\n"
            f"  other errors: {r['other_errors'] or 'none'}")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("burst", help="many requests at once: how fast overload is answered",
                                   description=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL of the API (127.0.0.1 only)")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--num-requests", type=int, default=400, help="requests sent at once")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each admitted request decodes")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (servers with tenants)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_local(args.url)
    model = args.model or served_model(args.url, args.api_key)
    result = report(*asyncio.run(burst(args.url, model, args.num_requests, args.max_tokens, args.api_key)))
    print(format_report(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if not result["other_errors"] else 1
