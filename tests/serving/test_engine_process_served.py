"""A served local engine in a process of its own: when that process dies, the stream it held ends
with an error event, requests meanwhile get a 503 with Retry-After (or wait for the new replica),
and Serve replaces the replica, which then serves target-only's tokens again."""

from __future__ import annotations

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


def engine_process_pid(parent: int) -> int:
    """The engine process started by the replica process `parent`."""
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
    (pid,) = children
    return pid


@pytest.fixture(scope="module", params=[False, True], ids=["separate", "colocated"])
def crash_app(deploy_app, engine_config, request):
    from ray import serve

    config = AppConfig(model_name="crash", engine=engine_config, model_server_num_cpus=0.25, router_num_cpus=0.1,
                       colocate_router=request.param)
    name = "crash_colocated" if request.param else "crash_separate"
    app = deploy_app(name, f"/{name}", config)
    yield app
    serve.delete(name)


def test_a_killed_engine_process_ends_its_stream_with_an_error_and_the_replica_is_replaced(
        crash_app, target_only) -> None:
    url = f"{crash_app.base_url}/completions"
    replica = model_server_pid(crash_app)
    engine = engine_process_pid(replica)
    body = {"model": "crash", "prompt": PROMPT, "max_tokens": 512, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # decoding
        os.kill(engine, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(rest[-2][len("data: "):])["error"]["code"] == "worker_error"
    assert rest[-1] == "data: [DONE]"

    request = {"model": "crash", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
               "return_token_ids": True}
    deadline = time.monotonic() + 180
    while (answer := httpx.post(url, json=request, timeout=120)).status_code != 200:
        assert answer.status_code == 503 and "retry-after" in answer.headers, answer.text
        assert time.monotonic() < deadline, "the replica was not replaced"
        time.sleep(1)
    assert answer.json()["choices"][0]["token_ids"] == target_only.generate(target_only.encode(PROMPT), MAX_TOKENS)
    assert model_server_pid(crash_app) != replica
