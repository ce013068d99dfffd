"""A step that fails because of one sequence fails that sequence alone: a fault injected into one
sequence (in the stop rules, the verification rule, the target's forward, or the drafter) during a
batch of 8; the other 7 finish exactly as they would have (greedy: the target alone; seeded
sampling: the same text as without the faulty neighbour). Also: requests the engine cannot run
are refused when they are added."""

from __future__ import annotations

import pytest

from dspark_ray.core.sampling import MAX_SEED, MAX_TOP_K, SamplingParams
from dspark_ray.engine import verifier as verifier_module
from dspark_ray.engine.engine import EngineUnavailable, SpeculativeEngine
from dspark_ray.engine.sequence import FinishReason, GenerationRequest, Sequence
from harness import Alternating, make_drafter, make_engine

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 9, 10], [20, 21], [30, 31, 32, 33, 30, 31, 32], [40, 41, 42],
           [50, 51, 50, 51], [60], [70, 71, 72, 73, 74, 75]]
CULPRIT = 3  # the index of the poisoned request
MAX_TOKENS = 20
SITES = ["stop-rule", "verification", "target-forward", "drafter"]


class Poisoned(RuntimeError):
    pass


class Poison:
    """Raises `Poisoned` from a wrapped engine part when the culprit is among the sequences it
    handles and has at least `after` output tokens."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.culprit: Sequence | None = None
        self.num_fired = 0

    def hits(self, seqs) -> bool:
        return (self.culprit is not None and any(seq is self.culprit for seq in seqs)
                and len(self.culprit.output_token_ids) >= self.after)

    def check(self, seqs) -> None:
        if self.hits(seqs):
            self.num_fired += 1
            raise Poisoned(f"poisoned sequence {self.culprit.seq_id}")


def inject(engine: SpeculativeEngine, site: str, poison: Poison, monkeypatch, hooks: list) -> None:
    """Wrap the part of `engine` named by `site` so it raises for the poisoned sequence."""
    if site == "stop-rule":  # mid-commit: the rows before the culprit have appended their tokens
        append = engine.stop_rules.append
        monkeypatch.setattr(engine.stop_rules, "append", lambda seq, tokens: (poison.check([seq]), append(seq, tokens)))
    elif site == "verification":  # after the target's forward appended every row's drafts
        verify = verifier_module._verify
        monkeypatch.setattr(verifier_module, "_verify",
                            lambda seqs, proposal, logits: (poison.check(seqs), verify(seqs, proposal, logits))[1])
    elif site == "target-forward":  # midway through the layers: some have appended to the cache, others not
        runner = engine.verifier.runner
        forward, armed = runner.forward, []

        def poisoned_forward(token_lists):
            armed[:] = [poison.culprit is not None and poison.culprit.seq_id in token_lists
                        and poison.hits([poison.culprit])]
            return forward(token_lists)

        def layer_hook(module, args):
            if armed and armed[0]:
                poison.check([poison.culprit])

        monkeypatch.setattr(runner, "forward", poisoned_forward)
        hooks.append(runner.model.model.layers[1].register_forward_pre_hook(layer_hook))
    elif site == "drafter":
        propose = engine.drafter.propose
        monkeypatch.setattr(engine.drafter, "propose",
                            lambda seqs, budgets, time_budget_s=None: (poison.check(seqs),
                                                                       propose(seqs, budgets, time_budget_s))[1])
    else:
        raise ValueError(site)


@pytest.fixture
def hooks():
    """Hook handles on the session's shared models, removed after the test."""
    handles = []
    yield handles
    for handle in handles:
        handle.remove()


def run(engine: SpeculativeEngine, requests: list[GenerationRequest], poison: Poison | None = None) -> list[Sequence]:
    seqs = [engine.add_request(request) for request in requests]
    if poison is not None:
        poison.culprit = seqs[CULPRIT]
    while engine.has_unfinished():
        engine.step()
    return seqs


def greedy_engine(models, drafter: str = "model-off") -> SpeculativeEngine:
    return make_engine(models.target, make_drafter(drafter, models.target, models.draft, 3), 3)


def assert_culprit_failed(culprit: Sequence, poison: Poison, expected_prefix: list[int] | None) -> None:
    assert poison.num_fired >= 1
    assert culprit.finish_reason == FinishReason.ERROR
    assert "Poisoned: poisoned sequence" in culprit.error
    assert len(culprit.output_token_ids) >= poison.after  # what it had before the failed step
    if expected_prefix is not None:
        assert culprit.output_token_ids == expected_prefix[:len(culprit.output_token_ids)]


@pytest.mark.parametrize("after", [0, 4], ids=["at-admission", "mid-generation"])
@pytest.mark.parametrize("site", SITES)
def test_a_fault_in_one_greedy_sequence_fails_it_alone(tiny, reference, monkeypatch, hooks, site, after):
    models = tiny("llama")
    engine = greedy_engine(models)
    engine.governor = Alternating()  # draft limits that change from step to step; retries are not timed
    poison = Poison(after)
    inject(engine, site, poison, monkeypatch, hooks)

    seqs = run(engine, [GenerationRequest(prompt, max_tokens=MAX_TOKENS) for prompt in PROMPTS], poison)

    for index, (seq, prompt) in enumerate(zip(seqs, PROMPTS)):
        if index != CULPRIT:
            assert seq.output_token_ids == reference("llama", prompt, MAX_TOKENS), index
            assert seq.finish_reason == FinishReason.LENGTH
    culprit = seqs[CULPRIT]
    if site == "drafter":  # the drafter is optional: the target alone finishes the culprit, identically
        assert poison.num_fired >= 1
        assert culprit.output_token_ids == reference("llama", PROMPTS[CULPRIT], MAX_TOKENS)
        assert culprit.finish_reason == FinishReason.LENGTH
    else:
        assert_culprit_failed(culprit, poison, reference("llama", PROMPTS[CULPRIT], MAX_TOKENS))
    assert not engine.running and not engine.undrafted
    assert engine.verifier.runner.seq_ids == [] and engine.drafter.runner.seq_ids == []


def test_a_culprit_admitted_beside_running_sequences_fails_alone(tiny, reference, monkeypatch):
    """The culprit's prompt is prefilled in the forward that verifies the others (fused admission)."""
    models = tiny("llama")
    engine = greedy_engine(models)
    poison = Poison(after=0)
    inject(engine, "verification", poison, monkeypatch, [])
    others = [engine.add_request(GenerationRequest(prompt, max_tokens=MAX_TOKENS)) for prompt in PROMPTS[:4]]
    engine.step()
    engine.step()
    poison.culprit = engine.add_request(GenerationRequest(PROMPTS[4], max_tokens=MAX_TOKENS))
    while engine.has_unfinished():
        engine.step()

    expected = [reference("llama", prompt, MAX_TOKENS) for prompt in PROMPTS[:4]]
    assert [seq.output_token_ids for seq in others] == expected
    assert_culprit_failed(poison.culprit, poison, None)
    assert poison.culprit.output_token_ids == []


def sampled_requests() -> list[GenerationRequest]:
    return [GenerationRequest(prompt, SamplingParams(temperature=0.9, top_k=40, seed=100 + index), MAX_TOKENS)
            for index, prompt in enumerate(PROMPTS)]


@pytest.mark.parametrize("site", SITES)
def test_a_fault_in_one_sampled_sequence_leaves_the_others_seeded_text(tiny, monkeypatch, hooks, site):
    models = tiny("llama")
    requests = sampled_requests()
    without_culprit = run(greedy_engine(models), requests[:CULPRIT] + requests[CULPRIT + 1:])
    engine = greedy_engine(models)
    poison = Poison(after=4)
    inject(engine, site, poison, monkeypatch, hooks)

    seqs = run(engine, requests, poison)

    survivors = seqs[:CULPRIT] + seqs[CULPRIT + 1:]
    assert [seq.output_token_ids for seq in survivors] == [seq.output_token_ids for seq in without_culprit]
    if site != "drafter":
        assert_culprit_failed(seqs[CULPRIT], poison, None)
    else:  # sampled with the target alone from then on: another sample, still finished
        assert seqs[CULPRIT].finish_reason == FinishReason.LENGTH


def test_a_drafter_that_always_fails_leaves_decoding_to_the_target(tiny, reference, monkeypatch):
    models = tiny("llama")
    engine = greedy_engine(models)

    def broken(*args, **kwargs):
        raise Poisoned("the drafter is broken")

    monkeypatch.setattr(engine.drafter, "propose", broken)
    seqs = run(engine, [GenerationRequest(prompt, max_tokens=MAX_TOKENS) for prompt in PROMPTS])

    assert [seq.output_token_ids for seq in seqs] == [reference("llama", prompt, MAX_TOKENS) for prompt in PROMPTS]
    assert all(seq.finish_reason == FinishReason.LENGTH for seq in seqs)


def test_the_largest_parameters_sampling_takes_run(tiny):
    """SamplingParams refuses what no step could run (tests/core/test_sampling.py); its bounds run."""
    engine = greedy_engine(tiny("llama"), "ngram")
    seqs = run(engine, [GenerationRequest(PROMPTS[0], SamplingParams(temperature=1.0, top_k=MAX_TOP_K, seed=MAX_SEED)),
                        GenerationRequest(PROMPTS[1], SamplingParams(temperature=1.0, seed=0))])
    assert all(seq.finish_reason == FinishReason.LENGTH for seq in seqs)


def test_a_prompt_the_target_cannot_embed_fails_alone(tiny, reference):
    """No injection: a token id past the vocabulary (the serving edge refuses it; a direct engine
    user may not) makes the target's forward raise on the CPU. It joins running sequences."""
    models = tiny("llama")
    engine = greedy_engine(models)
    seqs = [engine.add_request(GenerationRequest(prompt, max_tokens=MAX_TOKENS)) for prompt in PROMPTS]
    engine.step()
    bad = engine.add_request(GenerationRequest([5, models.target.config.vocab_size + 5, 7], max_tokens=MAX_TOKENS))
    while engine.has_unfinished():
        engine.step()

    assert [seq.output_token_ids for seq in seqs] == [reference("llama", prompt, MAX_TOKENS) for prompt in PROMPTS]
    assert bad.finish_reason == FinishReason.ERROR and bad.output_token_ids == [] and "IndexError" in bad.error


def test_an_unavailable_engine_fails_the_step_as_a_whole(tiny, monkeypatch):
    """`EngineUnavailable` (e.g. the target group is being rebuilt) blames no sequence: no retries."""
    engine = greedy_engine(tiny("llama"))
    for prompt in PROMPTS:
        engine.add_request(GenerationRequest(prompt, max_tokens=MAX_TOKENS))
    engine.step()
    calls = []

    def down(*args):
        calls.append(args)
        raise EngineUnavailable("the target is down")

    monkeypatch.setattr(engine.verifier, "verify_and_add", down)
    with pytest.raises(EngineUnavailable):
        engine.step()
    assert len(calls) == 1 and not engine.undrafted
