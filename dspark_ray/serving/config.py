"""Serving configuration: what one Serve application serves, and the Serve config file around it.

`AppConfig` is the `args` block of the application in a Ray Serve config file (the arguments of
`dspark_ray.serving.app:build_app`). `ServeConfig` is the whole file as far as we use it: the
cluster-level HTTP and gRPC options plus our application. The same file works for
`dspark-ray serve --config FILE`, `serve deploy FILE` and a KubeRay RayService's serveConfigV2.
This module knows nothing about engines, Ray actors or HTTP handlers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, model_validator

from dspark_ray.config import EngineConfig, FrozenModel
from dspark_ray.serving.distributed.placement import WorkerPlacement

IMPORT_PATH = "dspark_ray.serving.app:build_app"
GRPC_SERVICER_FUNCTION = "dspark_ray.serving.wire.add_inference_service"
DEFAULT_APP_NAME = "dspark"


class WorkersConfig(FrozenModel):
    """Where the models of one model-server replica run."""

    mode: Literal["local", "distributed"] = Field(
        "local",
        description=(
            "'local': the engine runs on the model-server replica's machine, in its process or a child "
            "process (see `engine_process`). 'distributed': the "
            "target runs on tensor-parallel worker actors and the drafter on its own actor, reserved by "
            "the replica through a placement group (see `placement`)."
        ),
    )
    engine_process: bool = Field(
        True,
        description=(
            "Mode 'local': step the engine in a child process of the replica, with a GIL of its own (as "
            "vLLM's engine core), instead of on a thread of the replica process."
        ),
    )
    engine_cpus: tuple[int, ...] | None = Field(
        None,
        min_length=1,
        description=(
            "Mode 'local' with engine_process: the CPU ids the engine process runs on (Linux CPU "
            "affinity), e.g. to keep it off the cores of the HTTP proxy, the router and Ray's daemons, "
            "as vLLM's CPU backend binds its threads. None: the replica's own CPUs."
        ),
    )
    placement: WorkerPlacement = Field(
        default_factory=WorkerPlacement,
        description="Worker actors of one model instance (mode 'distributed'): tp, resources per rank and "
                    "for the drafter, backend, pipelining, timeouts.",
    )

    @model_validator(mode="after")
    def _check_mode(self) -> "WorkersConfig":
        if self.placement.tp > 1 and self.mode != "distributed":
            raise ValueError("placement.tp > 1 runs on worker actors: set workers.mode to 'distributed'")
        if self.engine_cpus is not None and (self.mode != "local" or not self.engine_process):
            raise ValueError("engine_cpus pins the engine process: it needs mode 'local' and engine_process true")
        if self.engine_cpus is not None and min(self.engine_cpus) < 0:
            raise ValueError("engine_cpus are CPU ids, 0 or more")
        return self


class AutoscalingConfig(FrozenModel):
    """Serve autoscaling of model-server replicas (one replica = one model instance)."""

    min_replicas: int = Field(1, ge=0, description="Fewest model-server replicas (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most model-server replicas.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _check_range(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= autoscaling.max_replicas")
        return self

    @property
    def is_fixed(self) -> bool:
        return self.min_replicas == self.max_replicas


class TenantConfig(FrozenModel):
    """A client allowed in when API keys are configured."""

    name: str = Field(..., min_length=1, description="Tenant name, used in logs and metrics labels.")
    api_key: SecretStr = Field(..., min_length=8, description="Bearer token the tenant sends.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Most concurrent requests of this tenant per router replica (None: no quota)."
    )


class AppConfig(FrozenModel):
    """The `args` of `build_app`: one served model, its limits and its replicas."""

    model_name: str = Field("dspark-reference", min_length=1, description="Model name clients send as `model`.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Models and speculation settings.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Where the models run.")
    chat_template: str | None = Field(
        None, description="Jinja chat template used when the tokenizer has none (None: chat returns 400)."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one model-server replica holds at once (decoding or waiting in its engine)."
    )
    max_queued_requests: int = Field(
        64, ge=1, description=(
            "Requests a router replica lets wait on top of what the model servers hold "
            "(max_ongoing_requests x autoscaling.max_replicas); beyond that it answers over capacity."
        ),
    )
    over_capacity_status: Literal[429, 503] = Field(429, description="HTTP status of a request rejected as over capacity.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with over-capacity rejections.")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description=(
            "Deadline of one request inside the router; past it the request is cancelled and answered "
            "with a 504 (or an error event in a stream). None: no deadline."
        ),
    )
    max_request_body_bytes: int = Field(
        4 * 2**20, ge=1024, description=(
            "Largest request a router accepts, in bytes: a longer HTTP body (by its Content-Length, or "
            "while a chunked body is read) is answered 413 before any parsing, a longer gRPC message "
            "RESOURCE_EXHAUSTED."
        ),
    )
    request_body_timeout_s: float = Field(
        30.0, gt=0, description=(
            "Seconds a router waits for a whole HTTP request body; a client that sends it slower is "
            "answered 408, so a slow sender holds a connection for this long at most."
        ),
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Model-server replicas.")
    colocate_router: bool = Field(
        False, description=(
            "Run the router inside each model-server replica: one Serve deployment, no hop between the "
            "two per request and per delta; the router then scales with the model servers "
            "(router_replicas and router_num_cpus do not apply)."
        ),
    )
    router_replicas: int = Field(1, ge=1, description="Replicas of the HTTP/gRPC router deployment.")
    router_num_cpus: float = Field(0.25, ge=0, description="Ray CPUs reserved by one router replica.")
    model_server_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved by one model-server replica.")
    model_server_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved by one local-mode model-server replica.")
    torch_num_threads: int = Field(1, ge=1, description="torch CPU threads in a model-server replica.")
    engine_stall_timeout_s: float = Field(
        60.0, gt=0, description=(
            "Liveness: a model-server replica whose engine has requests waiting and has emitted nothing for "
            "this long fails Serve's health check, and Serve replaces it. An idle engine is never stalled. "
            "Leave room for a restarted engine process or a rebuilt target group to take up its requests."
        ),
    )
    tenants: tuple[TenantConfig, ...] = Field(
        (), description="Clients and their API keys; empty: no authentication."
    )

    @model_validator(mode="after")
    def _check_unique_tenants(self) -> "AppConfig":
        keys = [t.api_key.get_secret_value() for t in self.tenants]
        if len(set(keys)) != len(keys) or len({t.name for t in self.tenants}) != len(keys):
            raise ValueError("tenant names and api keys must be unique")
        return self

    @property
    def router_admission_limit(self) -> int:
        """Generations one router replica admits before it answers over capacity: what the model
        servers hold plus the queue; colocated, only its own model instance's."""
        held = self.max_ongoing_requests * (1 if self.colocate_router else self.autoscaling.max_replicas)
        return held + self.max_queued_requests

    def to_args(self) -> dict[str, Any]:
        """JSON-able `args` for a Serve config file (secrets written out in clear)."""
        args = self.model_dump(mode="json", exclude={"tenants"}, exclude_defaults=True)
        if self.tenants:
            args["tenants"] = [{**t.model_dump(mode="json", exclude_defaults=True),
                                "api_key": t.api_key.get_secret_value()} for t in self.tenants]
        return args


class ServeConfig(FrozenModel):
    """One Ray Serve config file holding one dspark application."""

    http_host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds (0.0.0.0 in clusters).")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port (OpenAI API, /health, /metrics).")
    grpc_port: int | None = Field(9000, ge=1, le=65535, description="Serve gRPC port; None disables gRPC ingress.")
    proxy_request_timeout_s: float | None = Field(
        None, gt=0, description=(
            "Serve's own end-to-end HTTP/gRPC timeout (http_options.request_timeout_s); a backstop that "
            "must not be shorter than the app's request_timeout_s. None: no proxy timeout."
        ),
    )
    app_name: str = Field(DEFAULT_APP_NAME, min_length=1, description="Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP route prefix of the application.")
    app: AppConfig = Field(default_factory=AppConfig, description="The application's arguments.")

    @model_validator(mode="after")
    def _check_timeouts(self) -> "ServeConfig":
        app_timeout = self.app.request_timeout_s or math.inf
        if self.proxy_request_timeout_s is not None and self.proxy_request_timeout_s < app_timeout:
            raise ValueError(
                "http_options.request_timeout_s must be >= the app's request_timeout_s, so that a slow "
                "request gets the app's OpenAI-style timeout error rather than the proxy's"
            )
        return self

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::") else self.http_host
        return f"http://{host}:{self.http_port}{self.route_prefix.rstrip('/')}/v1"

    @classmethod
    def from_file(cls, path: Path | str, app_name: str | None = None) -> "ServeConfig":
        return cls.from_serve_dict(yaml.safe_load(Path(path).read_text()), app_name)

    @classmethod
    def from_serve_dict(cls, raw: dict[str, Any], app_name: str | None = None) -> "ServeConfig":
        """Read a Ray Serve config (validated by Serve's own schema) and our app's args."""
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(raw)
        ours = [a for a in schema.applications if a.import_path == IMPORT_PATH and app_name in (None, a.name)]
        if len(ours) != 1:
            raise ValueError(f"expected exactly one application with import_path {IMPORT_PATH}"
                             + (f" named {app_name!r}" if app_name else "") + f", found {len(ours)}")
        app = ours[0]
        grpc_on = GRPC_SERVICER_FUNCTION in schema.grpc_options.grpc_servicer_functions
        return cls(http_host=schema.http_options.host, http_port=schema.http_options.port,
                   grpc_port=schema.grpc_options.port if grpc_on else None,
                   proxy_request_timeout_s=schema.http_options.request_timeout_s, app_name=app.name,
                   route_prefix=app.route_prefix or "/", app=AppConfig.model_validate(app.args))

    def http_options(self) -> dict[str, Any]:
        return {"host": self.http_host, "port": self.http_port, "request_timeout_s": self.proxy_request_timeout_s}

    def grpc_options(self) -> dict[str, Any]:
        if self.grpc_port is None:
            return {"grpc_servicer_functions": []}
        return {"port": self.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION],
                "request_timeout_s": self.proxy_request_timeout_s}

    def to_serve_dict(self) -> dict[str, Any]:
        """The Ray Serve config file for this configuration (what `serve deploy` reads)."""
        http = {k: v for k, v in self.http_options().items() if v is not None}
        grpc = {k: v for k, v in self.grpc_options().items() if v is not None}
        return {
            "proxy_location": "EveryNode",
            "http_options": http,
            "grpc_options": grpc,
            "applications": [{"name": self.app_name, "route_prefix": self.route_prefix,
                              "import_path": IMPORT_PATH, "args": self.app.to_args()}],
        }
