"""One rank of the tensor-parallel target group; rank 0 serves gRPC and drives the others.

Every rank holds a shard of the target, the same KV-cache bookkeeping and the same copies of the
sequences. Rank 0 receives a command, broadcasts it (verb + serialized request) over a gloo
control group, and then every rank applies it: identical cache operations and one forward, whose
collectives keep the ranks in lockstep. Only rank 0 rebuilds draft distributions and applies the
lossless rule (`TargetVerifier.add` / `verify`); the others run the forward halves (`prefill` /
`score`). With a DSpark drafter, rank 0 also captures the target's hidden states at the drafter's
layers and returns them with each result, for the coordinator to forward to the draft worker. A
plain class; the builder wraps it with `ray.remote`, one actor per rank, packed in the replica's
placement group.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

import grpc
import ray
import torch
import torch.distributed as dist

from dspark_ray.config import EngineConfig
from dspark_ray.engine.drafters.base import DraftProposal
from dspark_ray.engine.factory import feature_layer_ids
from dspark_ray.engine.loading import load_tokenizer, vocab_size
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.threads import configure_threads
from dspark_ray.engine.verifier import TargetVerifier
from dspark_ray.serving.distributed import convert
from dspark_ray.serving.distributed.mirror import SequenceMirror, SequenceStateError
from dspark_ray.serving.distributed.server import CommandRunner, start_server
from dspark_ray.serving.distributed.tensor_parallel import (RankEnvironment, Sharding, check_group, init_group,
                                                            load_target_shard, open_rendezvous, parameter_bytes)
from dspark_ray.serving.wire import worker_pb2 as pb
from dspark_ray.serving.wire import worker_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_REQUESTS = {"add": pb.TargetAddRequest, "verify": pb.VerifyRequest, "sync": pb.TargetSyncRequest,
             "remove": pb.RemoveRequest}
_STOP = "stop"


class TargetWorker:
    def __init__(self, engine_config: EngineConfig, rank: int, world_size: int, num_threads: int = 1, *,
                 secret: str) -> None:
        """`secret`: the deployment's worker credential, which every RPC to rank 0 must carry."""
        configure_threads(num_threads)
        self.engine_config = engine_config
        self.rank = rank
        self.world_size = world_size
        self.host = ray.util.get_node_ip_address()
        self._secret = secret
        self.mirror = SequenceMirror()
        self.runner = CommandRunner()
        self.verifier: TargetVerifier | None = None
        self.vocab_size = 0
        self._control: dist.ProcessGroup | None = None  # carries commands; None with one rank
        self.backend = "none"  # of the process group, after an all-reduce went through it
        self._address: str | None = None
        self._store: dist.TCPStore | None = None  # rank 0's rendezvous store, once asked

    def rendezvous(self, timeout_s: float) -> tuple[str, int]:
        """Open the group's rendezvous store; (host, port) for MASTER_ADDR / MASTER_PORT. Asked of rank 0."""
        self._store = open_rendezvous(self.host, self.world_size, timeout_s)
        return self.host, self._store.port

    def start(self, master_addr: str, master_port: int, backend: str, sharding: Sharding, timeout_s: float) -> str | None:
        """Join the group and load this rank's shard; rank 0 returns its gRPC address."""
        gpu_ids = ray.get_gpu_ids()  # Ray makes the rank's own GPU device 0 of this process
        env = RankEnvironment(self.rank, self.world_size, 0 if gpu_ids else self.rank, master_addr, master_port)
        if self.world_size > 1 or backend == "nccl":  # one GPU: still a (one-rank) nccl group
            control = init_group(env, backend, timeout_s, self._store)
            self._control = control if self.world_size > 1 else None
            self.backend = check_group(self.engine_config.device)
        model = load_target_shard(self.engine_config, self.world_size, sharding)
        pad_token_id = load_tokenizer(self.engine_config.target).pad_token_id or 0
        # Rank 0 answers, so only it captures the layers a DSpark drafter needs: the residual stream
        # between decoder layers is whole on every rank (sharded blocks all-reduce their outputs).
        capture = feature_layer_ids(self.engine_config) if self.rank == 0 else None
        self.verifier = TargetVerifier(CausalLMRunner(model, pad_token_id, capture, self.engine_config.packed_forwards,
                                                      self.engine_config.absorbed_mla))
        self.vocab_size = vocab_size(model)
        if self.rank == 0:
            self.server, self._address = start_server(pb_grpc.add_TargetWorkerServicer_to_server, _Servicer(self),
                                                      self.host, self._secret)
        else:
            threading.Thread(target=self._follow, name=f"target-rank-{self.rank}", daemon=True).start()
        return self._address

    def describe(self) -> dict[str, object]:
        model = self.verifier.runner.model
        return {"rank": self.rank, "world_size": self.world_size, "backend": self.backend,
                "device": str(self.verifier.runner.device), "dtype": str(self.verifier.runner.dtype),
                "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()], "model": type(model).__name__}

    def parameter_bytes(self) -> dict[str, int]:
        return asdict(parameter_bytes(self.verifier.runner.model))

    def shutdown(self) -> None:
        if self.rank == 0 and self._address is not None:
            self.server.stop(grace=None)
            if self._control is not None:
                dist.broadcast_object_list([(_STOP, b"")], src=0, group=self._control)

    # --- rank 0: one command at a time, broadcast, then apply like every rank ---

    def command(self, verb: str, request):
        if self._control is not None:
            dist.broadcast_object_list([(verb, request.SerializeToString())], src=0, group=self._control)
        return self._apply(verb, request)

    def health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        clock = self.runner.clock
        response = pb.HealthResponse(role="target", num_sequences=len(self.mirror), num_commands=clock.num_commands,
                                     busy_s=clock.busy_s, idle_s=clock.idle_s, world_size=self.world_size)
        if request.reset_times:
            clock.reset()
        return response

    # --- ranks > 0 ---

    def _follow(self) -> None:
        try:
            while True:
                message = [None]
                dist.broadcast_object_list(message, src=0, group=self._control)
                verb, data = message[0]
                if verb == _STOP:
                    return
                try:
                    self._apply(verb, _REQUESTS[verb].FromString(data))
                except SequenceStateError:  # raised on rank 0 too, at the same point, before any forward
                    pass
        except Exception:  # the group is broken: rank 0's collectives fail and the coordinator rebuilds it
            logger.exception("target rank %d stopped following", self.rank)

    # --- every rank ---

    def _apply(self, verb: str, request):
        if verb == "add":
            return self._add(request)
        if verb == "verify":
            return self._verify(request)
        if verb == "sync":
            self.verifier.sync(self.mirror.apply(request.updates))
            return pb.SyncResponse()
        self.verifier.remove(self.mirror.remove(request.seq_ids))
        return pb.RemoveResponse()

    def _add(self, request: pb.TargetAddRequest):
        seqs = self.mirror.add(request.seqs)
        if self.rank != 0:
            self.verifier.prefill(seqs)
            return None
        output = self.verifier.add(seqs)
        return pb.TargetAddResponse(results=convert.results_to_wire(output, seqs))

    def _verify(self, request: pb.VerifyRequest):
        self.verifier.sync(self.mirror.apply(request.updates))
        seqs = self.mirror.get(item.seq_id for item in request.items)
        if self.rank != 0:
            self.verifier.score(seqs, convert.proposal_from_verify_items(request.items, None))
            return None
        self.mirror.reseed(seqs, [item.seed for item in request.items])
        proposal: DraftProposal = convert.proposal_from_verify_items(request.items, self.vocab_size)
        output = self.verifier.verify(seqs, proposal)
        return pb.VerifyResponse(results=convert.results_to_wire(output, seqs))


class _Servicer(pb_grpc.TargetWorkerServicer):
    def __init__(self, worker: TargetWorker) -> None:
        self.worker = worker

    def Add(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.command, "add", request)

    def Verify(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.command, "verify", request)

    def Sync(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.command, "sync", request)

    def Remove(self, request, context: grpc.ServicerContext):
        return self.worker.runner.run(context, self.worker.command, "remove", request)

    def Health(self, request, context: grpc.ServicerContext):
        return self.worker.health(request)
