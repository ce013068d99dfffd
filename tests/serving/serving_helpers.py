"""Constants and helpers shared by the serving tests and their conftest (imported as a top-level module)."""

from __future__ import annotations

from pathlib import Path

# For stand-in tokenizers without one; the bundled tokenizer brings its own.
FALLBACK_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
                          "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
ALICE_KEY = "sk-alice-0123456789"  # tiny_app tenant without a quota
BOB_KEY = "sk-bob-0123456789"  # tiny_app tenant with max_ongoing_requests 1


def haproxy_pids_serving(port: int) -> list[int]:
    """HAProxy processes whose config binds `port` (Serve's high-throughput mode writes one per node)."""
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


def start_local_ray() -> None:
    """The session's one local Ray cluster, whichever fixture asks first. Its Serve runs in the mode
    `dspark-ray serve` starts it in by default (high-throughput: gRPC between replicas)."""
    import ray

    from dspark_ray.serving.serve_cli import serve_env_vars

    # Logical CPUs: deployments reserve fractions of these; the 2 real cores are shared anyway.
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                       **serve_env_vars()}})
