"""`bench burst`'s HTTP client against a scripted socket server: each response form the server can
send (Content-Length or chunked rejections, a chunked SSE stream, a body that is no OpenAI error)."""

from __future__ import annotations

import asyncio
import json

from dspark_ray.bench.burst_client import request_bytes, send_together

ERROR = json.dumps({"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                              "code": "over_capacity"}}).encode()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (*parts, b""))


def sse(*events: dict | str) -> list[bytes]:
    return [b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n" for e in events]


ANSWERS = {
    "/length": b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(ERROR), ERROR),
    "/chunked": b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunked(ERROR[:10], ERROR[10:]),
    "/plain": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
    # the token event split across chunks, as a proxy may cut it
    "/stream": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
        *sse({"choices": [{"text": "", "token_ids": []}]}), b'data: {"choices": [{"text": "a", "tok',
        b'en_ids": [5, 6]}]}\n\n', *sse({"choices": [{"text": "b", "token_ids": [7]}]}, "[DONE]")),
}


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    path = head.split(b" ")[1].decode()
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    writer.write(ANSWERS[path])
    await writer.drain()
    await reader.read()  # the client closes once it has its answer


async def _run() -> list:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        requests = [request_bytes(f"{url}{path}", {"model": "m", "prompt": "p"}, api_key="k") for path in ANSWERS]
        results, spread_s = await send_together(url, requests, timeout_s=30)
    assert spread_s >= 0
    return results


def test_each_response_form() -> None:
    length, chunked_error, plain, stream = asyncio.run(_run())
    assert (length.status, length.retry_after, length.error, length.ok) == (429, "1", "429 over_capacity", False)
    assert (chunked_error.status, chunked_error.retry_after, chunked_error.error) == (503, "2", "503 over_capacity")
    assert (plain.status, plain.retry_after, plain.error) == (503, None, "no OpenAI error body")
    assert stream.ok and stream.status == 200 and stream.num_output_tokens == 3
    assert 0 < stream.ttft_s <= stream.e2e_s
    assert all(r.e2e_s > 0 for r in (length, chunked_error, plain))


def test_request_bytes_carry_the_body_and_the_key() -> None:
    raw = request_bytes("http://127.0.0.1:8000/v1/completions", {"model": "m"}, api_key="secret")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert b"Authorization: Bearer secret" in head and json.loads(body) == {"model": "m"}
    assert f"Content-Length: {len(body)}".encode() in head
