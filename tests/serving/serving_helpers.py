"""Constants and helpers shared by the serving tests and their conftest (imported as a top-level module)."""

from __future__ import annotations


# For stand-in tokenizers without one; the bundled tokenizer brings its own.
FALLBACK_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
                          "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
ALICE_KEY = "sk-alice-0123456789"  # tiny_app tenant without a quota
BOB_KEY = "sk-bob-0123456789"  # tiny_app tenant with max_ongoing_requests 1


def start_local_ray() -> None:
    """The session's one local Ray cluster, whichever fixture asks first. Its Serve runs in the mode
    `dspark-ray serve` starts it in by default (high-throughput: gRPC between replicas)."""
    import ray

    from dspark_ray.serving.serve_cli import serve_env_vars

    # Logical CPUs: deployments reserve fractions of these; the 2 real cores are shared anyway.
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                       **serve_env_vars()}})


class ScriptedRunner:
    """Takes commands; the test delivers the deltas."""
    context_limit = 128
    num_active = 0

    def start(self, server) -> None:  # a ModelServer
        self.commands = []
        self.restarts_fail = False

    def restart(self) -> None:
        if self.restarts_fail:
            raise RuntimeError("no engine today\nstill none")

    def submit(self, command) -> None:
        self.commands.append(command)

    def is_alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass
