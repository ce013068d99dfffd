"""The coordinator's proxies against scripted workers (no Ray): what crosses, and what a fault does."""

from __future__ import annotations

import grpc
import pytest
import torch

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.sequence import GenerationRequest, Sequence
from dspark_ray.serving.distributed.remote import (RemoteDrafter, RemoteVerifier, TargetUnavailable, WireMeter,
                                                   draw_seed)
from dspark_ray.serving.wire import worker_pb2 as pb


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "scripted"


class ScriptedStub:
    """Records requests; answers from `replies[verb]` (a response, or an exception to raise)."""

    def __init__(self, replies: dict) -> None:
        self.replies = replies
        self.calls: list[tuple[str, object]] = []

    def __getattr__(self, verb: str):
        def call(request, timeout: float):
            self.calls.append((verb, request))
            reply = self.replies[verb]
            if isinstance(reply, Exception):
                raise reply
            return reply(request) if callable(reply) else reply
        return call


class FakeHandle:
    def __init__(self, stub: ScriptedStub | None, generation: int = 1) -> None:
        self.stub, self.generation = stub, generation
        self.failures: list[int] = []

    def current(self):
        return None if self.stub is None else (self.stub, self.generation)

    def wait(self, timeout_s: float):
        if self.stub is None:
            from dspark_ray.serving.distributed.workers import WorkerUnavailable
            raise WorkerUnavailable("down")
        return self.current()

    def report_failure(self, generation: int, error) -> None:
        self.failures.append(generation)


def _seq(seq_id: int, prompt: list[int], output: list[int], temperature: float = 0.0) -> Sequence:
    seq = Sequence.create(seq_id, GenerationRequest(prompt, SamplingParams(temperature=temperature, seed=seq_id)))
    seq.output_token_ids.extend(output)
    return seq


def _drafts(request: pb.ProposeRequest) -> pb.ProposeResponse:
    return pb.ProposeResponse(drafts=[pb.Draft(draft_token_ids=[7] * item.max_draft_tokens) for item in request.items])


def test_drafter_sends_only_new_tokens_and_feedback() -> None:
    stub = ScriptedStub({"Add": pb.DraftAddResponse(), "Propose": _drafts})
    drafter = RemoteDrafter(FakeHandle(stub), WireMeter(), timeout_s=1.0)
    seqs = [_seq(1, [1, 2, 3], [4]), _seq(2, [5], [6])]
    drafter.add(seqs)
    assert drafter.propose(seqs, [2, 1]).num_draft_tokens.tolist() == [2, 1]
    seqs[0].output_token_ids.extend([7, 8])
    drafter.on_verified(seqs, [2, 1], [1, 0])
    drafter.propose(seqs, [3, 3])
    verb, request = stub.calls[-1]
    assert verb == "Propose"
    assert [(u.seq_id, u.num_known_tokens, list(u.new_token_ids)) for u in request.updates] == [(1, 4, [7, 8])]
    assert [(f.seq_id, f.num_draft_tokens, f.num_accepted_tokens) for f in request.feedback] == [(1, 2, 1), (2, 1, 0)]


def test_sequences_without_features_reach_the_worker_at_their_first_proposal() -> None:
    stub = ScriptedStub({"Add": pb.DraftAddResponse(), "Propose": _drafts, "Remove": pb.RemoveResponse()})
    drafter = RemoteDrafter(FakeHandle(stub), WireMeter(), timeout_s=1.0)
    drafting, governed_off = _seq(1, [1, 2], [3]), _seq(2, [5], [6])
    drafter.add([drafting, governed_off])
    assert stub.calls == []  # nothing to prefill on the worker yet
    drafting.output_token_ids.append(4)
    drafter.propose([drafting], [2])
    (add_verb, add), (propose_verb, _) = stub.calls
    assert add_verb == "Add" and [list(s.output_token_ids) for s in add.seqs] == [[3, 4]]
    assert propose_verb == "Propose"
    drafter.remove([1, 2])
    verb, remove = stub.calls[-1]
    assert verb == "Remove" and list(remove.seq_ids) == [1]  # the worker never heard of sequence 2


def test_drafter_timeout_goes_target_only_and_reports_the_worker() -> None:
    handle = FakeHandle(ScriptedStub({"Add": pb.DraftAddResponse(),
                                      "Propose": FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED)}))
    drafter = RemoteDrafter(handle, WireMeter(), timeout_s=1.0)
    seqs = [_seq(1, [1, 2], [3])]
    drafter.add(seqs)
    proposal = drafter.propose(seqs, [4])
    assert proposal.num_draft_tokens.tolist() == [0] and handle.failures == [1]
    handle.stub = None  # being replaced
    assert drafter.propose(seqs, [4]).num_draft_tokens.tolist() == [0]


def test_a_new_draft_worker_gets_whole_sequences_once() -> None:
    stub = ScriptedStub({"Add": pb.DraftAddResponse(), "Propose": _drafts})
    handle = FakeHandle(stub)
    drafter = RemoteDrafter(handle, WireMeter(), timeout_s=1.0)
    seqs = [_seq(1, [1, 2], [3, 4, 5])]
    drafter.add(seqs)
    drafter.on_verified(seqs, [1], [1])
    handle.generation = 2  # restarted: knows nothing
    drafter.propose(seqs, [2])
    (add_verb, add), (propose_verb, propose) = stub.calls[-2:]
    assert add_verb == "Add" and list(add.seqs[0].output_token_ids) == [3, 4, 5]
    assert propose_verb == "Propose" and not propose.updates and not propose.feedback


def test_seeds_come_from_the_sequence_generator_only_when_sampling() -> None:
    greedy, sampled, twin = _seq(1, [1], []), _seq(2, [1], [], 0.9), _seq(2, [1], [], 0.9)
    state = greedy.generator.get_state()
    assert draw_seed(greedy) == 0 and torch.equal(greedy.generator.get_state(), state)
    assert draw_seed(sampled) == draw_seed(twin) and draw_seed(sampled) != draw_seed(_seq(3, [1], [], 0.9))


def test_target_failure_raises_and_reports_but_a_state_mismatch_does_not_rebuild() -> None:
    add = pb.TargetAddResponse(results=[pb.VerifyResult(output_token_ids=[9], num_accepted_tokens=0)])
    handle = FakeHandle(ScriptedStub({"Add": add, "Verify": FakeRpcError(grpc.StatusCode.UNAVAILABLE),
                                      "Remove": FakeRpcError(grpc.StatusCode.UNAVAILABLE)}))
    verifier = RemoteVerifier(handle, WireMeter(), timeout_s=1.0, recovery_timeout_s=1.0)
    seqs = [_seq(1, [1, 2], [])]
    assert verifier.add(seqs).result.tokens(0) == [9]
    from dspark_ray.engine.drafters.base import DraftProposal

    with pytest.raises(TargetUnavailable, match="UNAVAILABLE"):
        verifier.verify(seqs, DraftProposal.empty(1))
    assert handle.failures == [1]
    verifier.remove([1])  # never raises, even against a dead worker
    handle.failures.clear()
    handle.stub.replies["Verify"] = FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION)
    verifier.known.mark(seqs)
    with pytest.raises(TargetUnavailable):
        verifier.verify(seqs, DraftProposal.empty(1))
    assert handle.failures == []


def test_sequences_of_a_replaced_target_group_fail_clearly() -> None:
    add = pb.TargetAddResponse(results=[pb.VerifyResult(output_token_ids=[9], num_accepted_tokens=0)])
    handle = FakeHandle(ScriptedStub({"Add": add}))
    verifier = RemoteVerifier(handle, WireMeter(), timeout_s=1.0, recovery_timeout_s=1.0)
    seqs = [_seq(1, [1, 2], [])]
    verifier.add(seqs)
    handle.generation = 2
    from dspark_ray.engine.drafters.base import DraftProposal

    with pytest.raises(TargetUnavailable, match="lost"):
        verifier.verify(seqs, DraftProposal.empty(1))
    handle.stub = None
    with pytest.raises(TargetUnavailable):
        verifier.add([_seq(2, [1], [])])
