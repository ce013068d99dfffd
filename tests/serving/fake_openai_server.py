"""A small, real OpenAI-compatible HTTP server for tests of `bench serve --compare-url`: it answers
GET /v1/models and streamed POST /v1/completions (SSE, one token a chunk, a final usage chunk)
with the tokens of a function it is given, e.g. HF's own greedy `generate` on the target. Requests
cross a real socket; nothing of the client is mocked. Knows nothing of sampling or stop strings."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (prompt, max_tokens) -> [(token id, its text)] of the completion
Complete = Callable[[str, int], list[tuple[int, str]]]


class FakeOpenAIServer:
    def __init__(self, complete: Complete, model: str = "other", send_token_ids: bool = True) -> None:
        self.complete, self.model, self.send_token_ids = complete, model, send_token_ids
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                body = json.dumps({"object": "list", "data": [{"id": server.model, "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tokens = server.complete(request["prompt"], request["max_tokens"])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for token_id, text in tokens:
                    choice = {"index": 0, "text": text, "finish_reason": None}
                    if server.send_token_ids:
                        choice["token_ids"] = [token_id]
                    self._event({"object": "text_completion", "model": server.model, "choices": [choice]})
                self._event({"object": "text_completion", "model": server.model, "choices": [],
                             "usage": {"prompt_tokens": 0, "completion_tokens": len(tokens)}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def _event(self, payload: dict) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

        return Handler


def hf_greedy(target_dir) -> Complete:
    """HF `generate`, greedy, on the target: the oracle the engine's outputs must equal."""
    import torch

    from dspark_ray.engine.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(target_dir), load_tokenizer(target_dir)
    lock = threading.Lock()  # one generate at a time: the model is shared between request threads

    def complete(prompt: str, max_tokens: int) -> list[tuple[int, str]]:
        prompt_ids = tokenizer.encode(prompt)
        with lock, torch.no_grad():
            output = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens)
        ids = output[0, len(prompt_ids):].tolist()
        texts = [tokenizer.decode(ids[:n]) for n in range(len(ids) + 1)]
        return [(token_id, texts[n + 1][len(texts[n]):]) for n, token_id in enumerate(ids)]
    return complete
