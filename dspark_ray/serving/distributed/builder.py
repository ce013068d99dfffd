"""`build_distributed_engine`: one model instance on worker actors, driven by a pipelined engine.

The coordinator is the same `SpeculativeEngine` (here `PipelinedEngine`) with a `RemoteVerifier`
in front of a tensor-parallel target group and a `RemoteDrafter` in front of a draft worker,
reserved through one placement group. The coordinator loads no weights: only the tokenizer and
the target's configuration (EOS ids, context limit) for the stop rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from transformers import AutoConfig, GenerationConfig

from dspark_ray.config import EngineConfig
from dspark_ray.engine.drafters.base import Drafter, NoDrafter
from dspark_ray.engine.factory import drafting_governor
from dspark_ray.engine.loading import load_tokenizer
from dspark_ray.engine.stopping import StopRules
from dspark_ray.serving.distributed.credential import new_secret
from dspark_ray.serving.distributed.pipeline import PipelinedEngine
from dspark_ray.serving.distributed.placement import WorkerPlacement, reserve
from dspark_ray.serving.distributed.remote import RemoteDrafter, RemoteVerifier, WireMeter, WireStats
from dspark_ray.serving.distributed.workers import DraftWorkerHandle, TargetGroupHandle
from dspark_ray.serving.wire import worker_pb2 as pb

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class WorkerTimes:
    """One worker's time since the last reset: executing commands, and waiting between them."""

    busy_s: float
    idle_s: float
    num_commands: int

    @property
    def idle_fraction(self) -> float:
        if self.busy_s == 0:  # no command at all (e.g. drafting governed off): idle throughout
            return 1.0
        return self.idle_s / (self.busy_s + self.idle_s)


class DistributedEngine(PipelinedEngine):
    """A `PipelinedEngine` that also owns its workers: stats, fault state, shutdown."""

    def __init__(self, *args, group: PlacementGroup, target: TargetGroupHandle, draft: DraftWorkerHandle | None,
                 meter: WireMeter, rpc_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.target = target
        self.draft = draft
        self.meter = meter
        self.rpc_timeout_s = rpc_timeout_s

    def wire_stats(self, reset: bool = False) -> WireStats:
        return self.meter.snapshot(reset)

    def worker_times(self, reset: bool = False) -> dict[str, WorkerTimes]:
        """Busy and idle time of the target (rank 0) and draft workers that are up."""
        times = {}
        for role, handle in (("target", self.target), ("draft", self.draft)):
            connection = handle.current() if handle is not None else None
            if connection is None:
                continue
            health = connection[0].Health(pb.HealthRequest(reset_times=reset), timeout=self.rpc_timeout_s)
            times[role] = WorkerTimes(health.busy_s, health.idle_s, health.num_commands)
        return times

    def shutdown(self) -> None:
        super().shutdown()
        for handle in (self.draft, self.target):
            if handle is not None:
                handle.shutdown()
        remove_placement_group(self.group)


def build_distributed_engine(engine_config: EngineConfig, placement: WorkerPlacement
                             ) -> tuple[DistributedEngine, Decode]:
    """Reserve and start the workers of one model instance; returns the coordinator engine and decode."""
    if not ray.is_initialized():
        ray.init()
    tokenizer = load_tokenizer(engine_config.target)
    decode: Decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    with_draft = engine_config.drafter != "none"
    group = reserve(placement, with_draft, placement.startup_timeout_s)
    secret = new_secret()  # this deployment's worker credential: handed to the workers through Ray
    target = TargetGroupHandle(engine_config, placement, group, secret)
    draft = DraftWorkerHandle(engine_config, placement, group, secret) if with_draft else None
    try:
        target.start()
        if draft is not None:
            draft.start()
    except Exception:
        for handle in (draft, target):
            if handle is not None:
                handle.shutdown()
        remove_placement_group(group)
        raise
    meter = WireMeter()
    verifier = RemoteVerifier(target, meter, placement.target_timeout_s, placement.startup_timeout_s,
                              placement.inline_sync)
    drafter: Drafter = NoDrafter() if draft is None else RemoteDrafter(draft, meter, placement.draft_timeout_s,
                                                                      placement.inline_sync)
    engine = DistributedEngine(verifier, drafter, coordinator_stop_rules(engine_config, decode),
                               engine_config.num_speculative_tokens, engine_config.max_batch_size,
                               drafting_governor(engine_config), pipelining=placement.pipelining,
                               time_boxed_drafting=placement.time_boxed_drafting, group=group,
                               target=target, draft=draft, meter=meter, rpc_timeout_s=placement.target_timeout_s)
    return engine, decode


def coordinator_stop_rules(engine_config: EngineConfig, decode: Decode) -> StopRules:
    """The in-process engine's stop rules, from the target's configuration files alone."""
    model_config = AutoConfig.from_pretrained(engine_config.target, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(engine_config.target, local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(model_config)
    eos = generation.eos_token_id
    if eos is None:
        eos = load_tokenizer(engine_config.target).eos_token_id
    eos_ids = set() if eos is None else set(eos) if isinstance(eos, list) else {eos}
    return StopRules(eos_ids, int(getattr(model_config, "max_position_embeddings", 2048)), decode)
