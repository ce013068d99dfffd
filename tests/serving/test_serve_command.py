"""`dspark-ray serve` as users run it: its own local Ray cluster, the real `openai` client, Ctrl-C.

The command starts Serve in Ray's high-throughput mode; with `--haproxy` HAProxy takes the port
instead of Serve's Python proxy. The test asks for HAProxy, looks for its process while serving
and for its absence after shutdown. It starts the command with SIGINT ignored, as a script's
background job inherits it: Ctrl-C must stop the server all the same. Without `--haproxy`, the
router replica's own HTTP server takes the port: the test looks for it there and sends a burst.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from dspark_ray.serving.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]

START_TIMEOUT_S = 240


def haproxy_pids_serving(port: int) -> list[int]:
    """HAProxy processes whose config binds `port` (Serve writes one config per node)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"haproxy"):
            continue
        configs = [Path(arg.decode()) for arg in argv if arg.endswith(b".cfg")]
        if any(f":{port}" in config.read_text() for config in configs if config.is_file()):
            pids.append(int(entry.name))
    return pids


class Output:
    """A process's output, read on a thread: a process blocked on a full pipe would never stop."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._reader.is_alive():
            if any(needle in line for line in self.lines):
                return
            time.sleep(0.1)
        if not any(needle in line for line in self.lines):
            raise AssertionError(f"no {needle!r} from dspark-ray serve; output:\n{self.tail()}")

    def tail(self, num_lines: int = 60) -> str:
        return "".join(self.lines[-num_lines:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="HAProxy ships for Linux only")
def test_serve_command_answers_behind_haproxy_and_stops_on_ctrl_c(model_dirs, target_only) -> None:
    port = free_port()
    command = [sys.executable, "-m", "dspark_ray.cli", "serve", "--target", str(model_dirs.target),
               "--draft", str(model_dirs.draft), "--port", str(port), "--grpc-port", "0", "--num-cpus", "4", "--haproxy"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # Started with SIGINT ignored, as a script's background job is: Ctrl-C must stop it all the same.
    ignoring_sigint = ["bash", "-c", 'trap "" INT; exec "$@"', "dspark-ray-serve", *command]
    process = subprocess.Popen(ignoring_sigint, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output = Output(process)
        output.wait_for("dspark-ray: serving", START_TIMEOUT_S)
        assert haproxy_pids_serving(port), "--haproxy should serve HTTP through HAProxy"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        prompt = "def fibonacci(n):"
        completion = client.completions.create(model="dspark-reference", prompt=prompt, max_tokens=12,
                                               temperature=0, extra_body={"return_token_ids": True})
        expected = target_only.generate(target_only.encode(prompt), 12)
        assert completion.choices[0].model_extra["token_ids"] == expected
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        try:
            returncode = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dspark-ray serve did not stop on Ctrl-C; output:\n{output.tail()}") from None
        assert returncode == 0, output.tail()
        # Serve's direct-ingress draining period held a stopping router for 30 s; locally it is 2 s
        assert time.monotonic() - interrupted < 20
        assert not haproxy_pids_serving(port), "Ctrl-C should stop HAProxy with the cluster"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


FAILING_START = """
import sys, ray
calls = []
def failing_init(*args, **kwargs):
    calls.append(kwargs)
    raise RuntimeError("Ray did not start in time")
ray.init = failing_init
from dspark_ray.cli import main
status = main(["serve", "--port", "8999"])
print(f"init calls: {len(calls)}; initialized: {ray.is_initialized()}; status: {status}")
"""


def test_a_failed_start_exits_with_one_error_and_starts_no_second_cluster() -> None:
    """Finding 7 of issue 22: shutting down after a failed ray.init called serve.shutdown(), which
    connects to a cluster and, with none, started a second local one."""
    run = subprocess.run([sys.executable, "-c", FAILING_START], capture_output=True, text=True, timeout=120)
    assert "init calls: 1; initialized: False; status: 1" in run.stdout, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("dspark-ray serve: error:")]
    assert errors == ["dspark-ray serve: error: Ray did not start in time"], run.stderr


TINY_LIMITS = """
applications:
  - name: dspark
    route_prefix: /
    import_path: dspark_ray.serving.app:build_app
    args: {max_ongoing_requests: 1, max_queued_requests: 1, retry_after_s: 2}
"""


def listener_pid(port: int) -> int:
    import psutil

    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    raise AssertionError(f"nothing listens on port {port}")


def listener_command(port: int) -> str:
    """The command line of the process listening on 127.0.0.1:`port`."""
    import psutil

    return " ".join(psutil.Process(listener_pid(port)).cmdline())


def assert_a_client_timeout_frees_the_request(base_url: str) -> None:
    """A unary request whose client gives up is cancelled: the router's running gauge drops to 0."""
    import httpx

    context = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    body = {"model": "dspark-reference", "prompt": "def f(", "max_tokens": context - 64, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page = httpx.get(f"{base_url}/metrics", timeout=10).text
        running = [line for line in page.splitlines() if line.startswith("dspark_num_requests_running{")]
        if running and float(running[0].rsplit(" ", 1)[1]) == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"the timed-out request still runs: {running}")


def assert_a_killed_router_replica_comes_back_on_the_port(port: int) -> None:
    """SIGKILL the router replica that serves the port: Serve starts another, which takes the same
    port back (quarantine 0), and a completion is answered there again."""
    import httpx

    killed = listener_pid(port)
    os.kill(killed, signal.SIGKILL)
    began, deadline = time.monotonic(), time.monotonic() + START_TIMEOUT_S
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                completion = client.completions.create(model="dspark-reference", prompt="def f(", max_tokens=4)
                break
        except (httpx.HTTPError, openai.APIError):
            pass
        time.sleep(0.5)
    else:
        raise AssertionError(f"no router on port {port} {START_TIMEOUT_S} s after its replica was killed")
    assert listener_pid(port) != killed and "ServeReplica:dspark:Router" in listener_command(port)
    assert completion.choices[0].text and completion.usage.completion_tokens >= 1
    print(f"router replica killed: serving again on port {port} after {time.monotonic() - began:.1f} s")


def test_the_router_replica_serves_the_port_and_answers_a_burst(tmp_path) -> None:
    """Issue 22, finding 8: without Serve's proxy in the way (the router replica's own HTTP server
    takes the port), a burst past the admission limit gets 200s and 429s with Retry-After and an
    OpenAI body, nothing else (how fast: `dspark-ray bench burst`, a benchmark, not a timed test); a
    client that gives up on a unary request still cancels it; a killed router replica is replaced
    on the same port."""
    from dspark_ray.bench.burst import burst, report

    config = tmp_path / "serve.yaml"
    config.write_text(TINY_LIMITS)
    port = free_port()
    command = [sys.executable, "-m", "dspark_ray.cli", "serve", "--config", str(config), "--port", str(port),
               "--grpc-port", "0", "--num-cpus", "4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output = Output(process)
        output.wait_for("dspark-ray: serving", START_TIMEOUT_S)
        assert "ServeReplica:dspark:Router" in listener_command(port)
        summary = report(*asyncio.run(burst(f"http://127.0.0.1:{port}/v1", "dspark-reference", 40, 8)))
        assert set(summary["statuses"]) <= {"200", "429"}, summary
        assert summary["num_admitted"] >= 1 and summary["num_rejected"] >= 1, summary
        assert summary["rejected_without_retry_after"] == 0 and summary["rejected_without_openai_body"] == 0
        assert not summary["other_errors"], summary
        assert_a_client_timeout_frees_the_request(f"http://127.0.0.1:{port}")
        assert_a_killed_router_replica_comes_back_on_the_port(port)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, output.tail()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
