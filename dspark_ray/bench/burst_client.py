"""A minimal HTTP/1.1 client for `bench burst`: one request per connection, opened before the burst.

An HTTP library spends a millisecond or more of Python per request; with hundreds of requests
leaving at once from one process, the last of them waits for the client itself, and the figure
says more about the client than about the server. This client opens every connection first (the
way a pooled client such as the OpenAI SDK keeps them open), then writes every prebuilt request in
one loop, so each request's clock starts when its bytes are handed to the kernel and stops when its
response (a rejection) or its first token (an admitted stream) is read. It understands only what
the benchmark needs: a status line, headers, a Content-Length body, and a chunked SSE stream. It
knows nothing about the server's limits.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlparse

from dspark_ray.bench.serve import RequestResult

HEAD_END = b"\r\n\r\n"


def request_bytes(url: str, body: dict, api_key: str | None = None) -> bytes:
    """A complete POST of `body` as JSON to `url` (keep-alive HTTP/1.1)."""
    parsed = urlparse(url)
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{auth}\r\n")
    return head.encode() + payload


class Exchange(asyncio.Protocol):
    """One request and its response on a connection of its own; `done` resolves to a RequestResult.

    `result.e2e_s` of a rejection is the time from `send()` to its last body byte; `result.ttft_s`
    of an admitted stream is the time from `send()` to the first event that carries token ids.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.done: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
        self.result = RequestResult(ok=False)
        self.buffer = bytearray()
        self.body = bytearray()  # a rejection's body, or a stream's de-chunked bytes not yet split into events
        self.content_length: int | None = None
        self.chunked = False
        self.head_read = False
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter() - self.sent_at
        self.buffer += data
        if not self.head_read and not self._read_head():
            return
        if self.chunked:
            self._read_chunks(now)
        elif self.content_length is not None and len(self.buffer) >= self.content_length:
            self._finish_error(bytes(self.buffer[:self.content_length]), now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.result.error = type(exc).__name__ if exc else "connection closed"
            self._finish(time.perf_counter() - self.sent_at)

    def _read_head(self) -> bool:
        end = self.buffer.find(HEAD_END)
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[:end + len(HEAD_END)]
        self.result.status = int(lines[0].split()[1])
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        self.result.retry_after = headers.get("retry-after")
        self.chunked = "chunked" in headers.get("transfer-encoding", "")
        self.content_length = int(headers["content-length"]) if "content-length" in headers else None
        self.head_read = True
        return True

    def _finish_error(self, raw: bytes, now: float) -> None:
        try:
            code = json.loads(raw)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        self.result.error = f"{self.result.status} {code}" if isinstance(code, str) else "no OpenAI error body"
        self._finish(now)

    def _read_chunks(self, now: float) -> None:
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            if len(self.buffer) < line_end + 2 + size + 2:
                return
            self.body += self.buffer[line_end + 2:line_end + 2 + size]
            del self.buffer[:line_end + 2 + size + 2]
            if self.result.status != 200:
                if size == 0:
                    self._finish_error(bytes(self.body), now)
                    return
                continue
            self._read_events(now)
            if size == 0 and not self.done.done():
                self.result.error = "stream ended without [DONE]"
                self._finish(now)
            if self.done.done():
                return

    def _read_events(self, now: float) -> None:
        *events, rest = bytes(self.body).split(b"\n\n")
        self.body = bytearray(rest)
        for event in events:
            data = event.decode().removeprefix("data: ")
            if data == "[DONE]":
                self.result.ok = self.result.error is None
                self._finish(now)
                return
            parsed = json.loads(data)
            if "error" in parsed:
                self.result.error = f"stream {parsed['error'].get('code')}"
            tokens = sum(len(choice.get("token_ids", [])) for choice in parsed.get("choices", []))
            if tokens and self.result.ttft_s is None:
                self.result.ttft_s = now
            self.result.num_output_tokens += tokens

    def _finish(self, now: float) -> None:
        self.result.e2e_s = now
        if not self.done.done():
            self.done.set_result(self.result)
        self.transport.close()


async def send_together(url: str, requests: list[bytes], timeout_s: float) -> tuple[list[RequestResult], float]:
    """Open one connection per request, then send them all in one loop; the results and the
    seconds between the first and the last send."""
    parsed = urlparse(url)
    loop = asyncio.get_running_loop()
    exchanges = [Exchange(request) for request in requests]
    await asyncio.gather(*(loop.create_connection(lambda e=e: e, parsed.hostname, parsed.port or 80) for e in exchanges))
    for exchange in exchanges:
        exchange.send()
    spread_s = exchanges[-1].sent_at - exchanges[0].sent_at
    await asyncio.wait([e.done for e in exchanges], timeout=timeout_s)
    for exchange in exchanges:
        if not exchange.done.done():
            exchange.result.error = "no answer"
            exchange._finish(timeout_s)
    return [e.result for e in exchanges], spread_s
