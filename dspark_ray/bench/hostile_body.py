"""`dspark-ray bench hostile-body`: what one hostile request costs the streams that are open.

Against a running server (`--url`), opens `--streams` greedy streams, waits until each has sent a
delta, then sends one hostile request (`--kind`): `body`, a body past the server's size limit
(`--body-mb` of JSON whitespace); `prompt`, a 3 MiB prompt (under the default limit, past any
context); `chat`, a chat with 3 MiB of system messages, tokenized before their length is known. Prints the hostile
request's status, code and time to answer, and per stream the largest gap between deltas while it
was in flight. Figures, not checks: the serving tests check the behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

PROMPTS = ("def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time")
LONG_TEXT = "ab " * 2**20  # 3 MiB
CHAT_SYSTEM_MESSAGES = 16


def hostile_request(kind: str, model: str, body_mb: float) -> tuple[str, dict[str, Any]]:
    """The path and httpx arguments of the hostile request."""
    if kind == "body":
        return "/completions", {"content": b" " * int(body_mb * 2**20), "headers": {"content-type": "application/json"}}
    if kind == "prompt":
        return "/completions", {"json": {"model": model, "prompt": LONG_TEXT}}
    part = LONG_TEXT[: len(LONG_TEXT) // CHAT_SYSTEM_MESSAGES]
    system = [{"role": "system", "content": part}] * CHAT_SYSTEM_MESSAGES
    return "/chat/completions", {"json": {"model": model, "messages": system + [{"role": "user", "content": "x"}]}}


async def stream(client, body: dict[str, Any], opened: asyncio.Event, arrivals: list[float]) -> None:
    async with client.stream("POST", "/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
                opened.set()


def largest_gap(arrivals: list[float], start: float, end: float) -> float:
    """The longest wait between deltas that overlaps [start, end]."""
    return max([b - a for a, b in zip(arrivals, arrivals[1:]) if b >= start and a <= end] or [0.0])


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout_s) as client:
        arrivals: list[list[float]] = [[] for _ in range(args.streams)]
        opened = [asyncio.Event() for _ in range(args.streams)]
        tasks = [asyncio.create_task(stream(client, {"model": args.model, "prompt": PROMPTS[i % len(PROMPTS)],
                                                     "max_tokens": args.max_tokens, "temperature": 0,
                                                     "ignore_eos": True, "stream": True}, opened[i], arrivals[i]))
                 for i in range(args.streams)]
        await asyncio.gather(*(event.wait() for event in opened))
        path, request = hostile_request(args.kind, args.model, args.body_mb)
        start = time.perf_counter()
        response = await client.post(path, **request)
        end = time.perf_counter()
        await asyncio.gather(*tasks)
    return {"kind": args.kind, "status": response.status_code, "code": response.json().get("error", {}).get("code"),
            "answered_s": round(end - start, 3),
            "largest_gap_s": [round(largest_gap(a, start, end), 3) for a in arrivals],
            "deltas": [len(a) for a in arrivals]}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("hostile-body", help="one hostile request during open streams, against a server",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    parser.add_argument("--model", default="dspark-reference", help="the served model name")
    parser.add_argument("--kind", choices=("body", "prompt", "chat"), default="body")
    parser.add_argument("--body-mb", type=float, default=10.0, help="size of the hostile body (MiB)")
    parser.add_argument("--streams", type=int, default=4, help="greedy streams open meanwhile")
    parser.add_argument("--max-tokens", type=int, default=400, help="tokens of each stream (ignore_eos)")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(bench(args))))
    return 0
