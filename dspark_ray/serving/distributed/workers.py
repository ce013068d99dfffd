"""Coordinator-side handles of the worker actors: launch them in their bundles, connect, replace.

A handle owns its actor(s) and the gRPC stub to them; the stub's channel carries the deployment's
worker credential on every call. A proxy that sees a call fail reports it
with the generation it used; the handle then kills the actor(s) (a hung worker too) and launches
new ones in the same placement-group bundles on a background thread, while `wait` / `current`
tell callers whether a worker is there. Each successful launch bumps the generation, which tells
a proxy that the new worker holds no sequences yet.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dspark_ray.config import EngineConfig
from dspark_ray.serving.distributed.credential import authenticated_channel
from dspark_ray.serving.distributed.draft_worker import DraftWorker
from dspark_ray.serving.distributed.placement import WorkerPlacement
from dspark_ray.serving.distributed.server import GRPC_OPTIONS
from dspark_ray.serving.distributed.target_worker import TargetWorker
from dspark_ray.serving.wire import worker_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class WorkerUnavailable(RuntimeError):
    """No worker is serving (it failed and its replacement is not up yet)."""


class _Supervised:
    role = "worker"

    def __init__(self, engine_config: EngineConfig, placement: WorkerPlacement, group: PlacementGroup,
                 secret: str) -> None:
        """`secret`: the deployment's worker credential (`credential.new_secret`), handed to every
        actor this handle launches, replacements included, and carried by every call to them."""
        self.engine_config = engine_config
        self.placement = placement
        self.group = group
        self._secret = secret
        self.actors: list = []
        self.address = ""  # where the current workers' gRPC server listens (host:port)
        self.generation = 0
        self.num_restarts = 0
        self._stub = None
        self._channel: grpc.Channel | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._restarting: threading.Thread | None = None

    def start(self) -> None:
        """Launch and connect, blocking (raises if the first launch fails)."""
        self._install(*self._launch())

    def current(self) -> tuple[object, int] | None:
        """(stub, generation) if a worker is serving now, else None; never waits."""
        with self._lock:
            return (self._stub, self.generation) if self._ready.is_set() else None

    def wait(self, timeout_s: float) -> tuple[object, int]:
        if not self._ready.wait(timeout_s):
            raise WorkerUnavailable(f"the {self.role} worker did not come back within {timeout_s:.0f} s")
        return self.current() or self.wait(timeout_s)

    def report_failure(self, generation: int, error: BaseException) -> None:
        with self._lock:
            if generation != self.generation or not self._ready.is_set() or self._closed:
                return  # already handled
            self._ready.clear()
            logger.warning("%s worker (generation %d) failed: %s; replacing it", self.role, generation, error)
            self._kill()
            self._restarting = threading.Thread(target=self._relaunch, name=f"relaunch-{self.role}", daemon=True)
            self._restarting.start()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._ready.clear()
            self._kill()

    def _relaunch(self) -> None:
        for attempt in range(1 << 30):
            if self._closed:
                return
            try:
                launched = self._launch()
            except Exception as error:  # noqa: BLE001 - keep trying: the replica must recover
                delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                logger.warning("relaunching the %s worker failed (%s); retrying in %.0f s", self.role, error, delay)
                time.sleep(delay)
                continue
            with self._lock:
                self.num_restarts += 1
            self._install(*launched)
            return

    def _install(self, actors: list, address: str) -> None:
        channel = authenticated_channel(address, self._secret, GRPC_OPTIONS)
        grpc.channel_ready_future(channel).result(timeout=self.placement.startup_timeout_s)
        with self._lock:
            if self._closed:
                _kill_all(actors)
                return
            self.actors, self._channel, self.address = actors, channel, address
            self._stub = self._make_stub(channel)
            self.generation += 1
            self._ready.set()

    def _kill(self) -> None:
        if self._channel is not None:
            self._channel.close()
        _kill_all(self.actors)
        self.actors, self._channel, self._stub = [], None, None

    def _launch(self) -> tuple[list, str]:
        raise NotImplementedError

    def _make_stub(self, channel: grpc.Channel):
        raise NotImplementedError


class DraftWorkerHandle(_Supervised):
    role = "draft"

    def _launch(self) -> tuple[list, str]:
        placement = self.placement
        actor = ray.remote(DraftWorker).options(
            num_cpus=placement.draft_num_cpus, num_gpus=placement.draft_num_gpus,
            resources=dict(placement.draft_resources), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement.draft_bundle_index),
        ).remote(self.engine_config, placement.draft_probs_max_support, placement.num_threads_per_worker,
                 placement.look_ahead, secret=self._secret)
        try:
            return [actor], ray.get(actor.address.remote(), timeout=placement.startup_timeout_s)
        except Exception:
            _kill_all([actor])
            raise

    def _make_stub(self, channel: grpc.Channel):
        return pb_grpc.DraftWorkerStub(channel)


class TargetGroupHandle(_Supervised):
    role = "target"

    def _launch(self) -> tuple[list, str]:
        placement = self.placement
        actors = [ray.remote(TargetWorker).options(
            num_cpus=placement.target_num_cpus_per_rank, num_gpus=placement.target_num_gpus_per_rank,
            max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, rank),
        ).remote(self.engine_config, rank, placement.tp, placement.num_threads_per_worker, secret=self._secret)
            for rank in range(placement.tp)]
        try:
            master_addr, master_port = ray.get(actors[0].rendezvous.remote(placement.startup_timeout_s),
                                              timeout=placement.startup_timeout_s)
            starts = [actor.start.remote(master_addr, master_port, placement.resolved_backend, placement.tp_sharding,
                                         placement.target_timeout_s) for actor in actors]
            return actors, ray.get(starts, timeout=placement.startup_timeout_s)[0]
        except Exception:
            _kill_all(actors)
            raise

    def _make_stub(self, channel: grpc.Channel):
        return pb_grpc.TargetWorkerStub(channel)

    def parameter_bytes(self) -> list[dict[str, int]]:
        """Per rank: {'total': ..., 'experts': ...} bytes of parameters it really holds."""
        return ray.get([actor.parameter_bytes.remote() for actor in self.actors])


def _kill_all(actors: list) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
