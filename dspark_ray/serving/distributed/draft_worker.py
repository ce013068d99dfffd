"""The draft worker: one drafter (draft LM, DSpark, MTP, n-gram) and its per-sequence caches, behind gRPC.

A plain class; the builder wraps it with `ray.remote` and places it in the draft bundle of the
replica's placement group (a GPU fraction, or CPU only). Each RPC converts, calls the drafter's
own verbs (`dspark_ray.engine.drafters.base.Drafter`), converts back. Sampled drafts are drawn
from the grid-rounded distribution the coordinator will forward (`codec.quantize`), so what the
target verifies against is exactly what the drafts were sampled from.

It knows nothing about the target, stop rules or other workers. The one exception is DSpark,
which borrows the target's token embeddings and lm_head: the worker reads just those tensors from
the target's checkpoint (`load_hollow_target`), never the target itself, and is fed the target's
hidden states at the drafter's layers through `Add` and the feedback of `Propose` / `Sync`. MTP
likewise: its layer from the target's checkpoint, the final norm from the hollow target.
"""

from __future__ import annotations

import functools
import time

import grpc
import ray
from torch import nn
from transformers import AutoConfig

from dspark_ray.config import EngineConfig
from dspark_ray.dspark.io import load_dspark
from dspark_ray.dspark.target_parts_loader import load_hollow_target
from dspark_ray.engine.drafters.base import Drafter
from dspark_ray.engine.drafters.draft_model import DraftModelDrafter
from dspark_ray.engine.drafters.dspark import DSparkDrafter
from dspark_ray.engine.drafters.mtp import MTPDrafter, load_mtp
from dspark_ray.engine.drafters.ngram import NgramDrafter
from dspark_ray.engine.factory import check_draft_target, schedule_verification
from dspark_ray.engine.loading import load_causal_lm, load_tokenizer
from dspark_ray.engine.threads import configure_threads
from dspark_ray.serving.distributed import codec, convert
from dspark_ray.serving.distributed.mirror import SequenceMirror
from dspark_ray.serving.distributed.server import CommandRunner, start_server
from dspark_ray.serving.distributed.tensor_parallel import parameter_bytes
from dspark_ray.serving.wire import worker_pb2 as pb
from dspark_ray.serving.wire import worker_pb2_grpc as pb_grpc


def build_worker_drafter(config: EngineConfig, max_support: int) -> Drafter:
    """The engine's drafter for `config`, minus the target: the worker never loads it."""
    return schedule_verification(config, _base_drafter(config, max_support))


def _base_drafter(config: EngineConfig, max_support: int) -> Drafter:
    on_grid = functools.partial(codec.quantize, max_support=max_support)  # what the coordinator forwards
    check_draft_target(config)
    if config.drafter == "model":
        pad_token_id = load_tokenizer(config.target).pad_token_id or 0
        return DraftModelDrafter(load_causal_lm(config.draft, config.dtype, config.device),
                                 config.num_speculative_tokens, config.adaptive_speculation,
                                 config.draft_confidence_threshold, pad_token_id, draft_probs_transform=on_grid)
    if config.drafter == "dspark":  # checked against the target's signature, fingerprint included
        hollow_target = load_hollow_target(config.target, config.dtype, config.device)
        return DSparkDrafter(load_dspark(config.draft, hollow_target, config.dtype), config.num_speculative_tokens,
                             draft_probs_transform=on_grid)
    if config.drafter == "mtp":  # the target's MTP layer, fed the target's last-layer states like DSpark
        hollow_target = load_hollow_target(config.target, config.dtype, config.device)
        pad_token_id = load_tokenizer(config.target).pad_token_id or 0
        return MTPDrafter(load_mtp(hollow_target, config.draft), hollow_target, config.num_speculative_tokens,
                          pad_token_id, draft_probs_transform=on_grid)
    if config.drafter == "ngram":  # one-hot distributions are on the grid already
        vocab_size = AutoConfig.from_pretrained(config.target, local_files_only=True).vocab_size
        return NgramDrafter(vocab_size, config.ngram_max, config.ngram_min)
    raise ValueError(f"drafter {config.drafter!r} is not available on a draft worker")


class DraftWorker:
    def __init__(self, engine_config: EngineConfig, draft_probs_max_support: int, num_threads: int = 1,
                 look_ahead: bool = False, *, secret: str) -> None:
        """`secret`: the deployment's worker credential, which every RPC must carry."""
        configure_threads(num_threads)
        self.drafter = build_worker_drafter(engine_config, draft_probs_max_support)
        # Within-request pipelining: draft past each proposal while the target verifies it.
        self.look_ahead = look_ahead and hasattr(self.drafter, "look_ahead")
        self.mirror = SequenceMirror()
        self.runner = CommandRunner()
        self.server, self._address = start_server(pb_grpc.add_DraftWorkerServicer_to_server, _Servicer(self),
                                                 ray.util.get_node_ip_address(), secret)

    def address(self) -> str:
        return self._address

    def shutdown(self) -> None:
        self.server.stop(grace=None)

    def target_parameter_bytes(self) -> int:
        """Bytes of target parameters this process holds: DSpark's borrowed embeddings and lm_head
        (once when tied), 0 for other drafters."""
        drafter = getattr(self.drafter, "drafter", self.drafter)  # inside a ConfidenceScheduledDrafter
        if not isinstance(drafter, DSparkDrafter):
            return 0
        parts = drafter.model.target
        return parameter_bytes(nn.ModuleList([parts.embedding, parts.lm_head])).total

    def look_ahead_counts(self) -> tuple[int, int]:
        """(sequences looked ahead for, proposals that reused a look-ahead) so far."""
        return (getattr(self.drafter, "num_look_aheads", 0), getattr(self.drafter, "num_look_ahead_hits", 0))

    # --- commands (one at a time, see CommandRunner) ---

    def add(self, request: pb.DraftAddRequest) -> pb.DraftAddResponse:
        seqs = self.mirror.add(request.seqs)
        self.drafter.add(seqs, convert.features_from_wire(request.target_features, [s.seq_id for s in seqs]))
        return pb.DraftAddResponse()

    def propose(self, request: pb.ProposeRequest) -> pb.ProposeResponse:
        arrival = time.perf_counter()
        self._sync(request.updates, request.feedback)
        seqs = self.mirror.get(item.seq_id for item in request.items)
        self.mirror.reseed(seqs, [item.seed for item in request.items])
        time_budget = request.time_budget_s if request.HasField("time_budget_s") else None
        proposal = self.drafter.propose(seqs, [item.max_draft_tokens for item in request.items],
                                        _remaining(time_budget, arrival))
        if self.look_ahead:
            self.runner.run_after_this_command(functools.partial(self.drafter.look_ahead, seqs))
        return pb.ProposeResponse(drafts=convert.proposal_to_wire(proposal, seqs))

    def sync(self, request: pb.DraftSyncRequest) -> pb.SyncResponse:
        self._sync(request.updates, request.feedback)
        return pb.SyncResponse()

    def remove(self, request: pb.RemoveRequest) -> pb.RemoveResponse:
        self.drafter.remove(self.mirror.remove(request.seq_ids))
        return pb.RemoveResponse()

    def health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        clock = self.runner.clock
        response = pb.HealthResponse(role="draft", num_sequences=len(self.mirror), num_commands=clock.num_commands,
                                     busy_s=clock.busy_s, idle_s=clock.idle_s, world_size=1)
        if request.reset_times:
            clock.reset()
        return response

    def _sync(self, updates, feedback) -> None:
        self.mirror.apply(updates)
        if feedback:
            seqs = self.mirror.get(item.seq_id for item in feedback)
            features = None
            if any(item.HasField("target_features") for item in feedback):
                features = {item.seq_id: convert.tensor_from_wire(item.target_features) for item in feedback}
            self.drafter.on_verified(seqs, [item.num_draft_tokens for item in feedback],
                                     [item.num_accepted_tokens for item in feedback], features)


def _remaining(time_budget_s: float | None, since: float) -> float | None:
    """What is left of a command's time budget, if it has one."""
    return None if time_budget_s is None else max(0.0, time_budget_s - (time.perf_counter() - since))


class _Servicer(pb_grpc.DraftWorkerServicer):
    def __init__(self, worker: DraftWorker) -> None:
        self.worker = worker

    def Add(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.add, request)

    def Propose(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.propose, request)

    def Sync(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.sync, request)

    def Remove(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.remove, request)

    def Health(self, request, context: grpc.ServicerContext):
        return self.worker.health(request)  # answered even while a command runs
