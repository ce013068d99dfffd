"""The router and its model instance in one replica (`AppConfig.colocate_router`).

One Serve deployment instead of two: the ingress replica builds a `ServedModel` and calls it in
this process through a `LocalHandle`, so a request skips the hop from router to model server and
every delta the hop back. The router then scales with the model instances: one router per model
replica, autoscaled with them.
"""

from __future__ import annotations

from dspark_ray.serving.config import AppConfig
from dspark_ray.serving.local_handle import LocalHandle
from dspark_ray.serving.router import Router
from dspark_ray.serving.served_model import ServedModel


class ColocatedRouter(Router):
    def __init__(self, config: AppConfig, grpc_loopback_only: bool = False) -> None:
        self.served = ServedModel(config)
        super().__init__(LocalHandle(self.served), config, grpc_loopback_only)

    def num_active(self) -> int:
        return self.served.num_active()

    def check_health(self) -> None:
        """Serve's health check: a dead or stalled engine fails the replica, and Serve replaces it."""
        self.served.check_health()

    def _model_server_healthy(self) -> bool:
        return self.served.health_problem() is None
