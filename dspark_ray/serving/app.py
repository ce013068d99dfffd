"""Build the Serve application: a Router ingress in front of a ModelServer deployment, or, with
`colocate_router`, one deployment whose replicas are routers holding their model instance.

`build_app` is the `import_path` of the Serve config file (`dspark_ray.serving.app:build_app`),
its `args` are an `AppConfig`. Serve decorators are applied here, at build time, so `Router` and
`ServedModel` stay plain classes. A model-server replica is one model instance; in distributed
mode it reserves its worker actors through a placement group of its own (one bundle per target
rank, packed, then the drafter's, which may go to another node type). The router is told whether
Serve's HTTP proxy binds a loopback address, and then answers gRPC calls from this machine only
(`dspark_ray.serving.exposure`).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from dspark_ray.serving.colocated import ColocatedRouter
from dspark_ray.serving.config import AppConfig
from dspark_ray.serving.exposure import is_loopback, open_endpoint_warning, serve_http_host
from dspark_ray.serving.router import MODEL_SERVER_DEPLOYMENT, ROUTER_DEPLOYMENT, Router
from dspark_ray.serving.served_model import ServedModel

# Serve's own limit on a router replica, on top of its admission limit: /health, /metrics and
# /v1/models calls, and the requests past the limit, which the router answers over capacity at once.
# Serve would hold those in a queue of its own until an admitted request finished.
ROUTER_EXTRA_ONGOING = 4096
# Our deployments never block their event loop (the engine steps on a thread of its own), so Serve
# may run their methods on the replica's main loop instead of a second loop thread: one thread hop
# and GIL hand-off less per streamed delta (`dspark-ray bench serve --launch` measures served c=1
# against the in-process engine).
SAME_LOOP_ENV_VARS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}

logger = logging.getLogger(__name__)


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    http_host = serve_http_host()
    warning = open_endpoint_warning(http_host, len(config.tenants))
    if warning:
        logger.warning(warning)
    loopback_only = is_loopback(http_host)  # the gRPC ingress admits whom HTTP admits
    if config.colocate_router:
        colocated = serve.deployment(name=ROUTER_DEPLOYMENT, **colocated_options(config))
        return colocated(serve.ingress()(ColocatedRouter)).bind(config, loopback_only)
    model = serve.deployment(name=MODEL_SERVER_DEPLOYMENT, **model_server_options(config))(ServedModel)
    router = serve.deployment(name=ROUTER_DEPLOYMENT, **router_options(config))(serve.ingress()(Router))
    return router.bind(model.bind(config), config, loopback_only)


def model_server_options(config: AppConfig) -> dict[str, Any]:
    # No queue limit on the router's handle: the router admits at most its admission limit (which
    # counts max_queued_requests), and Serve's own count, enforced per handle and best effort,
    # turned admitted requests of a burst away when they all arrived at once.
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": -1,
        "ray_actor_options": {"num_cpus": config.model_server_num_cpus, "num_gpus": config.model_server_num_gpus,
                              "runtime_env": {"env_vars": SAME_LOOP_ENV_VARS}},
    }
    scaling = config.autoscaling
    if scaling.is_fixed:
        options["num_replicas"] = scaling.min_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                                         "target_ongoing_requests": scaling.target_ongoing_requests}
    if config.workers.mode == "distributed":
        # The replica reserves its worker actors itself (build_distributed_engine makes a placement
        # group from workers.placement); the replica process only coordinates.
        options["ray_actor_options"] = {"num_cpus": config.model_server_num_cpus,
                                        "runtime_env": {"env_vars": SAME_LOOP_ENV_VARS}}
    return options


def router_options(config: AppConfig) -> dict[str, Any]:
    # The router admits up to AppConfig.router_admission_limit generations itself and rejects the
    # rest; Serve's own limit only has to let them all reach it.
    return {
        "num_replicas": config.router_replicas,
        "max_ongoing_requests": config.router_admission_limit + ROUTER_EXTRA_ONGOING,
        "ray_actor_options": {"num_cpus": config.router_num_cpus, "runtime_env": {"env_vars": SAME_LOOP_ENV_VARS}},
    }


def colocated_options(config: AppConfig) -> dict[str, Any]:
    """The model server's resources and scaling; the limit of a router that is its own model server."""
    options = model_server_options(config)
    del options["max_queued_requests"]  # the replica queues (its router's admission limit), not a handle
    options["max_ongoing_requests"] = config.router_admission_limit + ROUTER_EXTRA_ONGOING
    return options
