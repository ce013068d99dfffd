"""The pipelined step strategy, in process (no Ray): same outputs, two alternating micro-batches."""

from __future__ import annotations

import threading

import pytest

from conftest import PROMPTS, engine_config, greedy_requests, outputs
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.serving.distributed.pipeline import PipelinedEngine, PipeliningChooser


def _pipelined(config, pipelining: str = "on") -> PipelinedEngine:
    local = build_engine(config, load_models(config))
    return PipelinedEngine(local.verifier, local.drafter, local.stop_rules, local.num_speculative_tokens,
                           local.max_batch_size, pipelining=pipelining)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_pipelined_greedy_output_is_the_engines(tiny, local_outputs, drafter: str) -> None:
    config = engine_config(tiny("llama"), drafter)
    engine = _pipelined(config)
    assert outputs(engine.generate(greedy_requests())) == local_outputs(config, greedy_requests())


def test_pipelining_off_is_the_plain_engine(tiny, local_outputs) -> None:
    config = engine_config(tiny("llama"), "model")
    assert outputs(_pipelined(config, "off").generate(greedy_requests())) == local_outputs(config, greedy_requests())


def test_micro_batches_alternate_and_overlap(tiny) -> None:
    engine = _pipelined(engine_config(tiny("llama"), "model"))
    calls: list[tuple[str, tuple[int, ...], str]] = []
    propose, verify = engine.drafter.propose, engine.verifier.verify

    def spy_propose(seqs, budgets, time_budget_s=None):
        calls.append(("propose", tuple(seq.seq_id for seq in seqs), threading.current_thread().name))
        return propose(seqs, budgets, time_budget_s)

    def spy_verify(seqs, proposal):
        calls.append(("verify", tuple(seq.seq_id for seq in seqs), threading.current_thread().name))
        return verify(seqs, proposal)

    engine.drafter.propose, engine.verifier.verify = spy_propose, spy_verify
    for request in greedy_requests(max_tokens=12):
        engine.add_request(request)
    for _ in range(4):
        engine.step()
    verified = [ids for kind, ids, _ in calls if kind == "verify"]
    assert set(verified[0]).isdisjoint(verified[1]) and set(verified[0]) | set(verified[1]) == set(range(len(PROMPTS)))
    assert verified[2] == verified[0] and verified[3] == verified[1]
    background = [ids for kind, ids, thread in calls if kind == "propose" and thread.startswith("propose")]
    assert background[:2] == [verified[1], verified[0]]  # drafted while the target verified the other half


def test_the_target_prefills_new_requests_while_the_drafter_drafts(tiny, local_outputs) -> None:
    config = engine_config(tiny("llama"), "model")
    engine = _pipelined(config)
    proposing, overlapped, watching = threading.Event(), [], []
    propose, add = engine.drafter.propose, engine.verifier.add

    def spy_propose(seqs, budgets, time_budget_s=None):
        if threading.current_thread().name.startswith("propose"):
            proposing.set()
        return propose(seqs, budgets, time_budget_s)

    def spy_add(seqs):
        if watching:  # not the first admission, which has nothing to overlap with
            overlapped.append(proposing.wait(timeout=2))  # times out if the drafter is not drafting
        return add(seqs)

    engine.drafter.propose, engine.verifier.add = spy_propose, spy_add
    early = [engine.add_request(request) for request in greedy_requests()[:3]]
    engine.step()
    engine.step()
    proposing.clear()
    watching.append(True)
    late = [engine.add_request(request) for request in greedy_requests()[3:]]
    while engine.has_unfinished():
        engine.step()
    assert overlapped == [True]
    assert outputs(early + late) == local_outputs(config, greedy_requests())


def test_finished_sequences_are_freed_next_to_the_next_steps_work(tiny, local_outputs) -> None:
    config = engine_config(tiny("llama"), "model")
    engine = _pipelined(config)
    removals: list[tuple[str, list[int], str]] = []
    remove_target, remove_draft = engine.verifier.remove, engine.drafter.remove

    def spy(role, remove):
        def spied(seq_ids):
            removals.append((role, list(seq_ids), threading.current_thread().name))
            return remove(seq_ids)
        return spied

    engine.verifier.remove, engine.drafter.remove = spy("target", remove_target), spy("draft", remove_draft)
    requests = [GenerationRequest(prompt, max_tokens=4 + 6 * i) for i, prompt in enumerate(PROMPTS)]
    seqs = [engine.add_request(request) for request in requests]
    while engine.has_unfinished():
        engine.step()

    assert outputs(seqs) == local_outputs(config, requests)
    for role, runner in (("target", engine.verifier.runner), ("draft", engine.drafter.runner)):
        freed = [seq_id for who, seq_ids, _ in removals if who == role for seq_id in seq_ids]
        assert sorted(freed) == sorted(seq.seq_id for seq in seqs) and runner.seq_ids == []
    assert any(role == "draft" and thread.startswith("propose") for role, _, thread in removals)


class ScriptedGovernor:
    """Draft limits in a fixed cycle; remembers what it was told."""

    def __init__(self, limits: list[int | None]) -> None:
        self.limits = limits
        self.asked: list[int | None] = []
        self.recorded: list[tuple[int, int | None, int]] = []

    def draft_limit(self, batch_size: int) -> int | None:
        self.asked.append(self.limits[len(self.asked) % len(self.limits)])
        return self.asked[-1]

    def record(self, batch_size: int, draft_limit: int | None, num_tokens: int, seconds: float) -> None:
        self.recorded.append((batch_size, draft_limit, num_tokens))


def test_pipelined_steps_draft_as_their_own_governor_says(tiny, local_outputs) -> None:
    config = engine_config(tiny("llama"), "model")
    local = build_engine(config, load_models(config))
    engine = PipelinedEngine(local.verifier, local.drafter, local.stop_rules, local.num_speculative_tokens,
                             local.max_batch_size, ScriptedGovernor([0, 0, 2, 2, 2, None, None]), pipelining="on")
    governor = engine.pipelined_governor
    assert governor is not engine.governor  # the unpipelined steps' verdicts stay apart
    budgets: list[tuple[int | None, int]] = []  # the step's limit, the largest budget asked of the drafter
    verified: list[tuple[int, int]] = []  # rows, drafts
    propose, verify = engine.drafter.propose, engine.verifier.verify

    def spy_propose(seqs, max_draft_tokens, time_budget_s=None):
        budgets.append((governor.asked[-1], max(max_draft_tokens)))
        return propose(seqs, max_draft_tokens, time_budget_s)

    def spy_verify(seqs, proposal):
        verified.append((len(seqs), int(proposal.num_draft_tokens.sum())))
        return verify(seqs, proposal)

    engine.drafter.propose, engine.verifier.verify = spy_propose, spy_verify
    seqs = [engine.add_request(request) for request in greedy_requests(max_tokens=24)]
    while engine.has_unfinished():
        engine.step()

    assert outputs(seqs) == local_outputs(config, greedy_requests(max_tokens=24))
    assert verified[:2] == [(len(PROMPTS), 0)] * 2  # drafting off: undrafted verifications of every sequence
    assert {limit for limit, _ in budgets} == {2, None}  # nothing asked of the drafter while off
    assert max(budget for limit, budget in budgets if limit == 2) == 2
    assert max(budget for limit, budget in budgets if limit is None) == config.num_speculative_tokens
    assert {limit for _, limit, _ in governor.recorded} == {0, 2, None}
    assert all(num_tokens > 0 for _, _, num_tokens in governor.recorded)


def test_abort_drops_rows_of_a_ready_proposal(tiny, local_outputs) -> None:
    config = engine_config(tiny("llama"), "model")
    engine = _pipelined(config)
    seqs = [engine.add_request(request) for request in greedy_requests()]
    engine.step()
    engine.abort([seqs[1].seq_id, seqs[4].seq_id])
    while engine.has_unfinished():
        engine.step()
    expected = local_outputs(config, greedy_requests())
    assert [seqs[i].output_token_ids for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]


def test_seeded_sampling_is_reproducible(tiny) -> None:
    config = engine_config(tiny("llama"), "model")
    requests = [GenerationRequest(prompt, SamplingParams(temperature=0.8, top_p=0.9, seed=i), max_tokens=12)
                for i, prompt in enumerate(PROMPTS)]
    assert outputs(_pipelined(config).generate(requests)) == outputs(_pipelined(config).generate(requests))


def test_auto_mode_switches_strategies_without_changing_the_output(tiny, local_outputs) -> None:
    config = engine_config(tiny("llama"), "model")
    engine = _pipelined(config, "auto")
    modes = []

    def switching_often() -> PipeliningChooser:
        chooser = PipeliningChooser(window=1, exploit_windows=1)  # switch nearly every step
        next_mode = chooser.next_mode
        chooser.next_mode = lambda: modes.append(next_mode()) or modes[-1]
        return chooser

    engine.new_chooser = switching_often
    assert outputs(engine.generate(greedy_requests())) == local_outputs(config, greedy_requests())
    assert True in modes and False in modes
    assert set(engine.choosers[8].rates) == {True, False}  # the 5 sequences' bucket timed both


class FixedChooser:
    """A pipelining chooser whose verdict is set; records which modes it was told about."""

    def __init__(self, pipelined: bool) -> None:
        self.pipelined = pipelined
        self.recorded: list[bool] = []

    def next_mode(self) -> bool:
        return self.pipelined

    def record(self, pipelined: bool, num_tokens: int, seconds: float) -> None:
        self.recorded.append(pipelined)


def test_auto_mode_keeps_a_verdict_per_load(tiny, local_outputs) -> None:
    config = engine_config(tiny("llama"), "model")
    engine = _pipelined(config, "auto")
    engine.choosers = {8: FixedChooser(True), 2: FixedChooser(False)}  # overlap pays at 5-8 sequences only
    seqs = [engine.add_request(request) for request in greedy_requests()]
    assert len(seqs) == 5
    for _ in range(3):
        engine.step()
    engine.abort([seq.seq_id for seq in seqs[2:]])
    while engine.has_unfinished():
        engine.step()
    assert engine.choosers[8].recorded == [True] * 3 and set(engine.choosers[2].recorded) == {False}
    assert outputs(seqs[:2]) == local_outputs(config, greedy_requests())[:2]


def test_chooser_exploits_the_faster_strategy() -> None:
    chooser = PipeliningChooser(window=2, exploit_windows=3)
    explored = [chooser.next_mode() for _ in range(4)]
    assert explored == [False, False, True, True]
    for pipelined in explored:
        chooser.record(pipelined, num_tokens=10 if pipelined else 5, seconds=1.0)
    assert [chooser.next_mode() for _ in range(6)] == [True] * 6 and chooser.preferred is True
    assert [chooser.next_mode() for _ in range(4)] == [True, True, False, False]  # again, the incumbent first


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("site", ["verify", "propose"])
def test_a_fault_in_one_sequence_fails_it_alone(tiny, local_outputs, site: str, sampled: bool) -> None:
    """A pipelined step that fails because of one sequence (verifying its micro-batch, or drafting
    it on the drafter's thread) is undone, the proposal in flight with it; the others go on as the
    plain engine runs them without the culprit, seeded samples too."""
    config = engine_config(tiny("llama"), "model")
    sampling = [SamplingParams(temperature=0.8, top_k=30, seed=i) if sampled else SamplingParams()
                for i in range(len(PROMPTS))]
    requests = [GenerationRequest(prompt, params, max_tokens=16) for prompt, params in zip(PROMPTS, sampling)]
    engine = _pipelined(config)
    culprit: list = []
    part = engine.verifier if site == "verify" else engine.drafter
    for verb in ("verify", "verify_and_add") if site == "verify" else ("propose",):  # pipelined, plain steps
        setattr(part, verb, poisoned(getattr(part, verb), culprit))
    seqs = [engine.add_request(request) for request in requests]
    culprit.append(seqs[2])
    while engine.has_unfinished():
        engine.step()

    survivors = seqs[:2] + seqs[3:]
    assert outputs(survivors) == local_outputs(config, requests[:2] + requests[3:])
    if site == "verify":
        assert seqs[2].finish_reason.value == "error" and "poisoned" in seqs[2].error
    else:  # a drafter fault: the target alone finishes it
        assert seqs[2].finish_reason.value == "length"
    assert engine.verifier.runner.seq_ids == [] and engine.drafter.runner.seq_ids == []


def poisoned(call, culprit: list):
    """`call` raising when the culprit is among its sequences with 4 output tokens or more."""
    def wrapped(seqs, *args):
        if any(seq is culprit[0] and len(seq.output_token_ids) >= 4 for seq in seqs):
            raise RuntimeError("poisoned")
        return call(seqs, *args)
    return wrapped
