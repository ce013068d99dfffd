"""Kill a served engine during open streams and see what the clients get.

Against a running `dspark-ray serve` (pid `--serve-pid`): first each request uninterrupted (for
the expected text), then `--streams` streams at once (greedy, or with `--temperature` > 0 sampled
with seed i for stream i: a seeded replay continues with the uninterrupted text too); when every stream has
received `--kill-after` chunks, SIGKILL every process under the server whose command line holds
`--victim` (the local engine process by default; `TargetWorker` for a tensor-parallel rank).
Prints how many streams ended with the expected text, the seconds from the kill until a request
sent at that moment is answered (serving resumed), and the longest pause within any stream.

    python deploy/crash_drill.py --serve-pid PID [--url http://127.0.0.1:8000/v1] [--victim TargetWorker --one]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef list_files(path):",
           "The quick brown fox"]


def descendants(root: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of every process under `root`."""
    parents, cmdlines = {}, {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdlines[int(proc.name)] = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += [(pid, cmdlines[pid]) for pid in children]
        frontier += children
    return found


async def stream(client: httpx.AsyncClient, url: str, body: dict, chunks: list[tuple[float, str]]) -> str | None:
    """The streamed text, or None if the stream ended with an error; appends (time, text) per chunk."""
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return None
            chunks.append((time.monotonic(), event["choices"][0]["text"]))
    return "".join(text for _, text in chunks)


async def drill(args: argparse.Namespace) -> None:
    url = f"{args.url}/completions"
    bodies = [{"model": args.model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
               "temperature": args.temperature, **({"seed": i} if args.temperature > 0 else {})}
              for i in range(args.streams)]
    unique = {json.dumps(body, sort_keys=True): body for body in bodies}
    async with httpx.AsyncClient(timeout=600) as client:
        answers = await asyncio.gather(*(client.post(url, json=body) for body in unique.values()))
        expected = {key: answer.json()["choices"][0]["text"] for key, answer in zip(unique, answers)}
        chunks: list[list[tuple[float, str]]] = [[] for _ in bodies]
        tasks = [asyncio.create_task(stream(client, url, body, got)) for body, got in zip(bodies, chunks)]
        while min(len(got) for got in chunks) < args.kill_after:
            await asyncio.sleep(0.005)
        victims = [pid for pid, cmdline in descendants(args.serve_pid) if args.victim.encode() in cmdline]
        victims = victims[:1] if args.one else victims
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        probe = await client.post(url, json={**bodies[0], "max_tokens": 1})
        probe_s = time.monotonic() - killed_at
        texts = await asyncio.gather(*tasks)
    identical = sum(text == expected[json.dumps(body, sort_keys=True)] for text, body in zip(texts, bodies))
    gaps = [max(later - earlier for (earlier, _), (later, _) in zip(got, got[1:])) for got in chunks if len(got) > 1]
    print(f"killed {len(victims)} process(es) matching {args.victim!r}: {identical}/{len(bodies)} streams "
          f"complete with the uninterrupted text, {texts.count(None)} failed")
    print(f"a new request sent at the kill answered {probe.status_code} after {probe_s:.1f} s; longest pause "
          f"between two chunks of a stream: {max(gaps):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-pid", type=int, required=True, help="pid of `dspark-ray serve`")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="dspark-reference")
    parser.add_argument("--victim", default="dspark_ray.serving.engine_process",
                        help="kill the server's processes whose command line holds this")
    parser.add_argument("--one", action="store_true", help="kill only the first such process (one TP rank)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, stream i seeded i")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kill-after", type=int, default=4, help="chunks every stream receives before the kill")
    asyncio.run(drill(parser.parse_args()))


if __name__ == "__main__":
    main()
