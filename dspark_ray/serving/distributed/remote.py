"""The coordinator's remote components: `RemoteVerifier` and `RemoteDrafter` implement the engine's
`Verifier` and `Drafter` protocols over gRPC, so the coordinator runs the unchanged
`SpeculativeEngine` (its commit and stop logic, its lossless rule executed where the target
logits are).

Per sequence, a proxy remembers how many committed tokens its worker knows and sends only the new
ones. For sampled sequences it draws one seed per command from the sequence's generator (the
coordinator's RNG); the worker draws that command's randomness from a generator seeded with it.
So a seeded request is reproducible, and the per-sequence order of draws never depends on batch
neighbours, on pipelining, or on whether the drafter is up.

Faults: a failed or late draft command reports the draft worker (it is replaced in the
background) and the step goes on with an empty draft: target-only decoding, the engine's rule,
identical greedy output. A failed target command reports the target group (it is rebuilt in the
background) and raises `TargetUnavailable` (a `VerifierStateLost`): the engine loop adds the
affected requests again, as continuations of what their clients were sent, and they wait for the
new group (`RemoteVerifier.resume` gives it their committed tokens).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
import torch

from dspark_ray.engine.drafters.base import DraftProposal, TargetFeatures
from dspark_ray.engine.runner import FUSED_PROMPT_TOKENS_PADDED
from dspark_ray.engine.sequence import Sequence
from dspark_ray.engine.faults import VerifierStateLost
from dspark_ray.engine.verifier import VerifyOutput
from dspark_ray.serving.distributed import convert
from dspark_ray.serving.distributed.workers import DraftWorkerHandle, TargetGroupHandle, WorkerUnavailable
from dspark_ray.serving.wire import worker_pb2 as pb

SEED_BOUND = 1 << 62


class TargetUnavailable(VerifierStateLost):
    """The target group failed (or is being rebuilt); the affected sequences cannot continue."""


def draw_seed(seq: Sequence) -> int:
    """This command's seed for a sampled sequence (0 for greedy ones, which draw nothing)."""
    if seq.request.sampling.is_greedy:
        return 0
    return int(torch.randint(SEED_BOUND, (1,), generator=seq.generator))


@dataclass(frozen=True)
class WireStats:
    bytes_sent: dict[str, int]  # by "role.Verb": serialized requests
    bytes_received: dict[str, int]  # by "role.Verb": serialized responses
    num_calls: dict[str, int]
    num_generated_tokens: int  # tokens the target emitted (first tokens, accepted, recovered, bonus)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values()) + sum(self.bytes_received.values())

    @property
    def bytes_per_generated_token(self) -> float:
        return self.total_bytes / max(1, self.num_generated_tokens)


@dataclass
class WireMeter:
    """Protobuf bytes of every command and response (gRPC framing adds ~5 bytes + headers per call)."""

    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    num_calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    num_generated_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, key: str, request, response) -> None:
        with self._lock:
            self.bytes_sent[key] += request.ByteSize()
            self.bytes_received[key] += response.ByteSize() if response is not None else 0
            self.num_calls[key] += 1

    def add_generated(self, num_tokens: int) -> None:
        with self._lock:
            self.num_generated_tokens += num_tokens

    def snapshot(self, reset: bool = False) -> WireStats:
        with self._lock:
            stats = WireStats(dict(self.bytes_sent), dict(self.bytes_received), dict(self.num_calls),
                              self.num_generated_tokens)
            if reset:
                for counts in (self.bytes_sent, self.bytes_received, self.num_calls):
                    counts.clear()
                self.num_generated_tokens = 0
        return stats


class _KnownTokens:
    """How many committed tokens of each sequence the current worker generation holds."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.generation = 0

    def on_generation(self, generation: int) -> None:
        if generation != self.generation:
            self.counts.clear()
            self.generation = generation

    def updates(self, seqs: list[Sequence]) -> list[pb.TokenUpdate]:
        """Fewer tokens than the worker holds (a failed step undone) roll its copy back."""
        return [convert.token_update(seq, min(self.counts[seq.seq_id], seq.num_tokens)) for seq in seqs
                if seq.num_tokens != self.counts[seq.seq_id]]

    def mark(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.counts[seq.seq_id] = seq.num_tokens


class RemoteVerifier:
    # The workers' protocol prefills in a call of its own (`verify_and_add`): a fused admission is one
    # apart, and prompts are fused only as far as a padded forward would take them.
    fused_prompt_limit = FUSED_PROMPT_TOKENS_PADDED

    def __init__(self, target: TargetGroupHandle, meter: WireMeter, timeout_s: float, recovery_timeout_s: float,
                 inline_sync: bool = True) -> None:
        self.target = target
        self.meter = meter
        self.timeout_s = timeout_s
        self.recovery_timeout_s = recovery_timeout_s
        self.inline_sync = inline_sync
        self.known = _KnownTokens()

    def add(self, seqs: list[Sequence]) -> VerifyOutput:
        stub, generation = self._connect()
        request = pb.TargetAddRequest(seqs=[convert.spec_to_wire(seq, draw_seed(seq)) for seq in seqs])
        response = self._call(stub, generation, "Add", request)
        self.known.mark(seqs)
        return self._output(response.results, seqs, 0)

    def resume(self, seqs: list[Sequence]) -> TargetFeatures | None:
        """The workers' Add of all committed tokens but the last (the next Verify sends the last):
        their cache is then what a step leaves. The first token the Add returns is dropped."""
        stub, generation = self._connect()
        request = pb.TargetAddRequest(seqs=[convert.resumed_spec_to_wire(seq) for seq in seqs])
        response = self._call(stub, generation, "Add", request)
        self.known.counts.update((seq.seq_id, seq.num_tokens - 1) for seq in seqs)
        return convert.results_from_wire(response.results, [seq.seq_id for seq in seqs], 0).target_features

    def verify(self, seqs: list[Sequence], proposal: DraftProposal) -> VerifyOutput:
        stub, generation = self._connect()
        lost = [seq.seq_id for seq in seqs if seq.seq_id not in self.known.counts]
        if lost:
            raise TargetUnavailable(f"sequences {lost} were lost with a failed target group")
        items = convert.verify_items_to_wire(seqs, proposal, [draw_seed(seq) for seq in seqs])
        request = pb.VerifyRequest(updates=self.known.updates(seqs), items=items)
        response = self._call(stub, generation, "Verify", request)
        self.known.mark(seqs)
        return self._output(response.results, seqs, proposal.draft_token_ids.shape[1])

    def verify_and_add(self, seqs: list[Sequence], proposal: DraftProposal, admitted: list[Sequence]
                       ) -> tuple[VerifyOutput, VerifyOutput | None]:
        """Two calls: the workers' protocol prefills and verifies apart."""
        added = self.add(admitted) if admitted else None
        return self.verify(seqs, proposal), added

    def sync(self, seqs: list[Sequence]) -> None:
        """Inline: the next Verify carries the commits. Otherwise send them now."""
        if self.inline_sync:
            return
        stub, generation = self._connect()
        tracked = [seq for seq in seqs if seq.seq_id in self.known.counts]
        updates = self.known.updates(tracked)
        if updates:
            self._call(stub, generation, "Sync", pb.TargetSyncRequest(updates=updates))
            self.known.mark(tracked)

    def remove(self, seq_ids: list[int]) -> None:
        """Never raises: removal is also how requests of a failed group are cleaned up."""
        tracked = [seq_id for seq_id in seq_ids if self.known.counts.pop(seq_id, None) is not None]
        current = self.target.current()
        if not tracked or current is None or current[1] != self.known.generation:
            return
        try:
            self._call(*current, "Remove", pb.RemoveRequest(seq_ids=tracked))
        except TargetUnavailable:
            pass

    def _connect(self) -> tuple[object, int]:
        try:
            stub, generation = self.target.wait(self.recovery_timeout_s)
        except WorkerUnavailable as error:
            raise TargetUnavailable(str(error)) from None
        self.known.on_generation(generation)
        return stub, generation

    def _call(self, stub, generation: int, verb: str, request):
        try:
            response = getattr(stub, verb)(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # state mismatches are bugs, not deaths
                self.target.report_failure(generation, error)
            raise TargetUnavailable(f"target worker failed in {verb}: {error.code().name}: {error.details()}") from None
        self.meter.record(f"target.{verb}", request, response)
        return response

    def _output(self, results, seqs: list[Sequence], max_draft: int) -> VerifyOutput:
        output = convert.results_from_wire(results, [seq.seq_id for seq in seqs], max_draft)
        self.meter.add_generated(int(output.result.acceptance_length.sum()))
        return output


class RemoteDrafter:
    def __init__(self, draft: DraftWorkerHandle, meter: WireMeter, timeout_s: float, inline_sync: bool = True) -> None:
        self.draft = draft
        self.meter = meter
        self.timeout_s = timeout_s
        self.inline_sync = inline_sync
        self.known = _KnownTokens()
        self.feedback: dict[int, pb.VerifyFeedback] = {}  # verifications the worker has not heard of yet

    def add(self, seqs: list[Sequence], target_features: TargetFeatures | None = None) -> None:
        """Sequences that bring target features (DSpark) are sent now, while the features exist.
        The others wait for their first proposal, which sends them whole: a sequence that never
        drafts (drafting governed off) costs the draft worker nothing."""
        connection = self._connect()
        if connection is not None and seqs and target_features is not None:
            self._add(connection, seqs, target_features)

    def propose(self, seqs: list[Sequence], max_draft_tokens: list[int], time_budget_s: float | None = None
                ) -> DraftProposal:
        seeds = [draw_seed(seq) if budget > 0 else 0 for seq, budget in zip(seqs, max_draft_tokens)]
        connection = self._connect()
        if connection is None:
            return DraftProposal.empty(len(seqs))
        missing = [seq for seq in seqs if seq.seq_id not in self.known.counts]
        if missing and not self._add(connection, missing, None):  # e.g. re-adding after a restart
            return DraftProposal.empty(len(seqs))
        items = [pb.DraftItem(seq_id=seq.seq_id, max_draft_tokens=budget, seed=seed)
                 for seq, budget, seed in zip(seqs, max_draft_tokens, seeds)]
        request = pb.ProposeRequest(updates=self.known.updates(seqs), feedback=self._take_feedback(seqs), items=items,
                                    time_budget_s=time_budget_s)
        response = self._call(connection, "Propose", request)
        if response is None:
            return DraftProposal.empty(len(seqs))
        self.known.mark(seqs)
        return convert.proposal_from_wire(response.drafts)

    def on_verified(self, seqs: list[Sequence], num_drafted: list[int], num_accepted: list[int],
                    target_features: TargetFeatures | None = None) -> None:
        for seq, drafted, accepted in zip(seqs, num_drafted, num_accepted):
            if target_features is None and seq.seq_id not in self.known.counts:
                continue  # not on the worker yet: its first proposal sends it whole
            message = pb.VerifyFeedback(seq_id=seq.seq_id, num_draft_tokens=drafted, num_accepted_tokens=accepted)
            if target_features is not None:
                features = _after_unsent(self.feedback.get(seq.seq_id), target_features[seq.seq_id])
                message.target_features.CopyFrom(convert.tensor_to_wire(features))
            self.feedback[seq.seq_id] = message
        if self.inline_sync:
            return
        connection = self._connect()
        tracked = [seq for seq in seqs if seq.seq_id in self.known.counts and not seq.is_finished]
        if connection is not None and tracked:
            request = pb.DraftSyncRequest(updates=self.known.updates(tracked), feedback=self._take_feedback(tracked))
            if self._call(connection, "Sync", request) is not None:
                self.known.mark(tracked)

    def remove(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.feedback.pop(seq_id, None)
        tracked = [seq_id for seq_id in seq_ids if self.known.counts.pop(seq_id, None) is not None]
        connection = self._connect()
        if connection is not None and tracked:
            self._call(connection, "Remove", pb.RemoveRequest(seq_ids=tracked))

    @property
    def is_up(self) -> bool:
        return self.draft.current() is not None

    def _connect(self) -> tuple[object, int] | None:
        connection = self.draft.current()
        if connection is not None:
            if connection[1] != self.known.generation:  # a new worker: it knows no sequence yet
                self.feedback.clear()
            self.known.on_generation(connection[1])
        return connection

    def _add(self, connection, seqs: list[Sequence], target_features: TargetFeatures | None) -> bool:
        for seq in seqs:
            self.feedback.pop(seq.seq_id, None)
        seq_ids = [seq.seq_id for seq in seqs]
        request = pb.DraftAddRequest(seqs=[convert.spec_to_wire(seq, 0, with_output=True) for seq in seqs],
                                     target_features=convert.features_to_wire(target_features, seq_ids))
        if self._call(connection, "Add", request) is None:
            return False
        self.known.mark(seqs)
        return True

    def _take_feedback(self, seqs: list[Sequence]) -> list[pb.VerifyFeedback]:
        return [self.feedback.pop(seq.seq_id) for seq in seqs if seq.seq_id in self.feedback]

    def _call(self, connection: tuple[object, int], verb: str, request):
        """The response, or None after reporting the worker: the caller goes on target-only."""
        stub, generation = connection
        try:
            response = getattr(stub, verb)(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            self.draft.report_failure(generation, error)
            return None
        self.meter.record(f"draft.{verb}", request, response)
        return response


def _after_unsent(unsent: pb.VerifyFeedback | None, features: torch.Tensor) -> torch.Tensor:
    """`features` preceded by those of an earlier verification the worker has not heard of yet
    (steps without a proposal, e.g. drafting governed off). Both hold committed tokens only."""
    if unsent is None or not unsent.HasField("target_features"):
        return features
    return torch.cat([convert.tensor_from_wire(unsent.target_features), features])
