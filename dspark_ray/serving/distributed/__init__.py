"""The distributed backend: draft and tensor-parallel target workers (Ray actors serving gRPC)
driven by a pipelined coordinator engine. Entry point: `build_distributed_engine`."""

from dspark_ray.serving.distributed.builder import DistributedEngine, build_distributed_engine
from dspark_ray.serving.distributed.placement import WorkerPlacement

__all__ = ["DistributedEngine", "WorkerPlacement", "build_distributed_engine"]
