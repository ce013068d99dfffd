"""A served local engine in a process of its own: when that process dies, the replica restarts it
and the stream it held goes on with target-only's text (a seeded sampled one with the text of an
uninterrupted run); when it stalls with a request open,
`/health` says so, Serve's health check replaces the replica, and the new one serves
target-only's tokens."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from dspark_ray.serving.config import AppConfig

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 16

pytestmark = pytest.mark.slow


def model_server_pid(app) -> int:
    """The process of the app's live model-server replica (from the GCS); colocated: its router's."""
    from ray._private import state

    deployment = "Router" if app.config.colocate_router else "ModelServer"
    (pid,) = [info["Pid"] for info in state.actors().values()
              if info["ActorClassName"] == f"ServeReplica:{app.name}:{deployment}" and info["State"] == "ALIVE"]
    return pid


def engine_process_pids(parent: int) -> set[int]:
    """The engine processes started by the replica process `parent` (the engine and its spare)."""
    children = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"dspark_ray.serving.engine_process" in cmdline:
            children.append(int(proc.name))
    assert children
    return set(children)


@pytest.fixture(scope="module", params=[False, True], ids=["separate", "colocated"])
def crash_app(deploy_app, engine_config, request):
    from ray import serve

    config = AppConfig(model_name="crash", engine=engine_config, model_server_num_cpus=0.25, router_num_cpus=0.1,
                       colocate_router=request.param, engine_stall_timeout_s=3.0)
    name = "crash_colocated" if request.param else "crash_separate"
    app = deploy_app(name, f"/{name}", config)
    yield app
    serve.delete(name)


def _stream(url: str, body: dict, on_first) -> list[str]:
    """The data lines of a streamed completion; `on_first()` runs once it is decoding."""
    with httpx.stream("POST", url, json=body, timeout=300) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        on_first()
        return [first] + [line for line in lines if line.startswith("data: ")]


def _text(lines: list[str]) -> str:
    return "".join(json.loads(line[len("data: "):])["choices"][0]["text"] for line in lines[:-1])


def test_a_killed_engine_process_is_restarted_and_its_stream_goes_on(crash_app, target_only) -> None:
    url = f"{crash_app.base_url}/completions"
    replica = model_server_pid(crash_app)
    engines = engine_process_pids(replica)
    body = {"model": "crash", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    lines = _stream(url, body, lambda: _signal_all(engines, signal.SIGKILL))  # the spare too: a cold restart
    assert lines[-1] == "data: [DONE]" and all("error" not in json.loads(line[6:]) for line in lines[:-1])
    expected = target_only.generate(target_only.encode(PROMPT), 64)
    assert _text(lines) == target_only.tokenizer.decode(expected, skip_special_tokens=True)
    assert not engine_process_pids(replica) & engines and model_server_pid(crash_app) == replica

    request = {"model": "crash", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
               "return_token_ids": True}
    answer = httpx.post(url, json=request, timeout=120)
    assert answer.json()["choices"][0]["token_ids"] == target_only.generate(target_only.encode(PROMPT), MAX_TOKENS)


def test_a_killed_engine_process_continues_a_seeded_sampled_stream_with_the_uninterrupted_text(crash_app) -> None:
    url = f"{crash_app.base_url}/completions"
    body = {"model": "crash", "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True, "temperature": 0.9,
            "top_p": 0.95, "seed": 1234, "stream": True}
    uninterrupted = _stream(url, body, lambda: None)
    engines = engine_process_pids(model_server_pid(crash_app))
    lines = _stream(url, body, lambda: _signal_all(engines, signal.SIGKILL))
    assert lines[-1] == "data: [DONE]" and all("error" not in json.loads(line[6:]) for line in lines[:-1])
    assert not engine_process_pids(model_server_pid(crash_app)) & engines  # it was killed mid-stream
    assert _text(lines) == _text(uninterrupted) and len(_text(lines)) > 0


def test_a_stopped_engine_fails_the_health_check_and_the_replica_is_replaced(crash_app, target_only) -> None:
    url = f"{crash_app.base_url}/completions"
    replica = model_server_pid(crash_app)
    engines = engine_process_pids(replica)
    body = {"model": "crash", "prompt": PROMPT, "max_tokens": 512, "ignore_eos": True, "temperature": 0,
            "stream": True}
    unhealthy = []
    try:
        with httpx.stream("POST", url, json=body, timeout=300) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # decoding
            _signal_all(engines, signal.SIGSTOP)
            deadline = time.monotonic() + 180
            while model_server_pid_or_none(crash_app) in (replica, None):
                assert time.monotonic() < deadline, "the stalled replica was not replaced"
                if _health_status(crash_app) == 503:
                    unhealthy.append(time.monotonic())
                time.sleep(0.5)
    finally:
        _signal_all(engines, signal.SIGKILL)
    assert unhealthy, "/health never said the model server was unhealthy"
    request = {"model": "crash", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
               "return_token_ids": True}
    deadline = time.monotonic() + 180
    while (answer := httpx.post(url, json=request, timeout=120)).status_code != 200:
        assert answer.status_code == 503 and "retry-after" in answer.headers, answer.text
        assert time.monotonic() < deadline, "the new replica does not serve"
        time.sleep(1)
    assert answer.json()["choices"][0]["token_ids"] == target_only.generate(target_only.encode(PROMPT), MAX_TOKENS)


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # e.g. ended by the old replica's shutdown
            os.kill(pid, signum)


def _health_status(app) -> int | None:
    """`/health`'s status; None when it does not answer (a colocated replica shutting down)."""
    try:
        return httpx.get(f"{app.root_url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return None


def model_server_pid_or_none(app) -> int | None:
    try:
        return model_server_pid(app)
    except ValueError:  # no live replica, or two while one replaces the other
        return None
