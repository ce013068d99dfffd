"""Client disconnects free their sequences; over capacity answers 429 with Retry-After (real Serve)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serving_helpers import ALICE_KEY, BOB_KEY

pytestmark = pytest.mark.engine

PROMPT = "def fibonacci(n):"


def _long_body(app, **fields) -> dict:
    """A request that decodes to the end of the context: it is still running when the test cuts it."""
    context = httpx.get(f"{app.base_url}/models", headers=_auth(app), timeout=30).json()["data"][0]["max_model_len"]
    return {"model": app.config.model_name, "prompt": PROMPT, "max_tokens": context - 64, "ignore_eos": True,
            "temperature": 0, **fields}


def _auth(app) -> dict[str, str]:
    return {"authorization": f"Bearer {ALICE_KEY}"} if app.config.tenants else {}


def test_disconnect_mid_stream_frees_the_sequence(any_app) -> None:
    assert any_app.wait_until_idle() == 0
    body = _long_body(any_app, stream=True)
    with httpx.stream("POST", f"{any_app.base_url}/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        first = next(line for line in events if line.startswith("data: "))
        assert '"text"' in first
        assert any_app.num_active() == 1
    # leaving the block closes the connection mid-stream
    started = time.monotonic()
    assert any_app.wait_until_idle() == 0
    assert time.monotonic() - started < 10


def test_client_timeout_on_unary_request_frees_the_sequence(any_app) -> None:
    assert any_app.wait_until_idle() == 0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{any_app.base_url}/completions", json=_long_body(any_app), timeout=1.5)
    assert any_app.wait_until_idle() == 0


def test_over_capacity_is_429_with_retry_after(tiny_app) -> None:
    """tiny_app: one request decoding, one queued in the router; the third is turned away."""
    assert tiny_app.wait_until_idle() == 0
    url, headers = f"{tiny_app.base_url}/completions", _auth(tiny_app)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60, headers=headers) as client:
            async with client.stream("POST", url, json=_long_body(tiny_app, stream=True)) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()  # stays referenced: a closed line iterator closes the stream
                while not (await anext(lines)).startswith("data: "):
                    pass
                queued = asyncio.create_task(client.post(url, json=_long_body(tiny_app)))
                await asyncio.sleep(1.5)  # let it reach the router's queue
                rejected = await client.post(url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
                queued.cancel()
                return rejected

    rejected = asyncio.run(scenario())
    assert rejected.status_code == 429, rejected.text
    assert rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"]["code"] == "over_capacity"
    assert tiny_app.wait_until_idle() == 0
    ok = httpx.post(url, headers=headers, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_tenant_quota(tiny_app) -> None:
    assert tiny_app.wait_until_idle() == 0
    url, headers = f"{tiny_app.base_url}/completions", {"authorization": f"Bearer {BOB_KEY}"}
    with httpx.stream("POST", url, json=_long_body(tiny_app, stream=True), headers=headers, timeout=60) as running:
        assert running.status_code == 200
        second = httpx.post(url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}, headers=headers,
                            timeout=60)
    assert second.status_code == 429 and second.json()["error"]["code"] == "tenant_quota_exceeded"
    assert second.headers["retry-after"] == "2"
    assert tiny_app.wait_until_idle() == 0


def test_a_burst_past_capacity_is_answered_with_429s_never_a_5xx(tiny_app) -> None:
    """Finding 8 of issue 22 (how fast: `dspark-ray bench burst`, a benchmark): every request of a
    burst far past the admission limit is admitted or answered 429 with Retry-After and an OpenAI
    body; nothing is dropped or answered 5xx, and the server serves after."""
    from dspark_ray.bench.burst import burst, report

    assert tiny_app.wait_until_idle() == 0
    summary = report(*asyncio.run(burst(tiny_app.base_url, "tiny", 60, 32, api_key=ALICE_KEY)))
    assert set(summary["statuses"]) <= {"200", "429"}, summary
    assert summary["num_admitted"] >= 1 and summary["num_rejected"] >= 1
    assert summary["num_admitted"] + summary["num_rejected"] == 60
    assert summary["rejected_without_retry_after"] == 0 and summary["rejected_without_openai_body"] == 0
    assert not summary["other_errors"]
    assert tiny_app.wait_until_idle() == 0
    ok = httpx.post(f"{tiny_app.base_url}/completions", headers=_auth(tiny_app), timeout=60,
                    json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200
