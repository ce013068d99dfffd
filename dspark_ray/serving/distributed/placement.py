"""Where one model instance's workers run, and the placement group that reserves them.

`WorkerPlacement` is the configuration (frozen pydantic, every field described); `reserve` turns
it into a Ray placement group: bundles 0..tp-1 are the target ranks, packed together, and the last
bundle is the draft worker's, which may ask for other resources (a GPU fraction, CPU only, a node
type). Ray Serve LLM reserves vLLM's workers the same way.
"""

from __future__ import annotations

from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.util.placement_group import PlacementGroup, placement_group

Backend = Literal["auto", "gloo", "nccl"]


class WorkerPlacement(BaseModel):
    """How the workers of one model instance are placed, connected and supervised."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel size: target ranks per model instance.")
    target_num_gpus_per_rank: float = Field(
        0.0, ge=0, description="GPUs reserved per target rank (1 on GPU nodes; 0 runs the target on CPU).")
    target_num_cpus_per_rank: float = Field(
        0.0, ge=0, description="CPUs reserved per target rank (a small fraction lets many share a laptop).")
    draft_num_gpus: float = Field(0.0, ge=0, description="GPUs (a fraction is fine) reserved for the draft worker.")
    draft_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved for the draft worker.")
    draft_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources of the draft bundle, e.g. a custom resource naming a cheap node type.")
    placement_strategy: Literal["PACK", "STRICT_PACK"] = Field(
        "PACK", description="Ray strategy of the placement group: PACK keeps the bundles together when they fit "
                            "on one node and lets the draft bundle land elsewhere; STRICT_PACK requires one node.")
    backend: Backend = Field(
        "auto", description="torch.distributed backend of the target group; 'auto' is nccl with GPUs, else gloo.")
    tp_sharding: Literal["auto", "manual"] = Field(
        "auto", description="'auto': transformers' tensor-parallel plan where the model has one; 'manual': this "
                            "package's MLP and expert sharding (always used for models without a plan).")
    pipelining: Literal["auto", "on", "off"] = Field(
        "auto", description="'on': split running sequences into two micro-batches and draft one while the target "
                            "verifies the other; 'off': propose and verify back to back; 'auto': time both on live "
                            "traffic, per batch-size bucket, and keep the faster (overlap loses at low load and where both "
                            "workers share a few CPU cores). "
                            "With load-aware drafting, pipelined steps have a governor of their own.")
    time_boxed_drafting: bool = Field(
        True, description="In a pipelined step, the draft worker stops drafting greedy rows once the target is "
                          "expected to be done verifying (its time in the last pipelined steps), so the target "
                          "does not wait for drafts; each row keeps its first draft. Output unchanged.")
    look_ahead: bool = Field(
        False, description="Within-request pipelining: while the target verifies a greedy draft, the draft worker "
                           "keeps drafting as if all of it were accepted, and the next proposal reuses that when "
                           "verification agrees (draft LM drafter; yields at once to the next command). Off by "
                           "default: it helps one or two sequences at a time and costs CPU time at high load "
                           "(`dspark-ray bench distributed`).")
    inline_sync: bool = Field(
        True, description="Send committed tokens inside the next propose/verify command instead of a separate "
                          "Sync command after each step (one round trip less per step).")
    draft_probs_max_support: int = Field(
        64, ge=1, le=65536, description="Most tokens kept per draft distribution of a sampled sequence; drafts are "
                                        "sampled from that rounded distribution, so verification stays exact.")
    num_threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker actor.")
    target_timeout_s: float = Field(
        120.0, gt=0, description="Deadline of one target command; past it the target group counts as failed.")
    draft_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one draft command; past it the step goes on target-only and the draft "
                                "worker is replaced.")
    startup_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for a worker (or a whole target group) to load and come up.")

    @model_validator(mode="after")
    def _check(self) -> "WorkerPlacement":
        if self.resolved_backend == "nccl" and self.target_num_gpus_per_rank < 1:
            raise ValueError("backend nccl needs target_num_gpus_per_rank >= 1 (one GPU per rank)")
        return self

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.target_num_gpus_per_rank > 0 else "gloo"

    @property
    def target_bundle(self) -> dict[str, float]:
        return _bundle(self.target_num_cpus_per_rank, self.target_num_gpus_per_rank, {})

    @property
    def draft_bundle(self) -> dict[str, float]:
        return _bundle(self.draft_num_cpus, self.draft_num_gpus, self.draft_resources)

    @property
    def draft_bundle_index(self) -> int:
        return self.tp


def reserve(placement: WorkerPlacement, with_draft: bool, timeout_s: float) -> PlacementGroup:
    bundles = [placement.target_bundle] * placement.tp + ([placement.draft_bundle] if with_draft else [])
    group = placement_group(bundles, strategy=placement.placement_strategy)
    if not group.wait(timeout_seconds=timeout_s):
        ray.util.remove_placement_group(group)
        raise TimeoutError(f"could not reserve {bundles} ({placement.placement_strategy}) in {timeout_s:.0f} s")
    return group


def _bundle(num_cpus: float, num_gpus: float, extra: dict[str, float]) -> dict[str, float]:
    bundle = {"CPU": num_cpus, "GPU": num_gpus, **extra}
    bundle = {name: amount for name, amount in bundle.items() if amount > 0}
    # Ray refuses empty bundles; a sliver of CPU reserves nothing that matters.
    return bundle or {"CPU": 0.001}
