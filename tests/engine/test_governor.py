"""Load-aware drafting: the strategy chooser, the governor's batch-size buckets, and an engine whose
drafting is switched on and off under it (never a changed token, never a changed sampled draw)."""

from __future__ import annotations

import time

import pytest

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.governor import DraftingCap, SpeculationGovernor
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.engine.strategy_chooser import StrategyChooser
from harness import Alternating, make_drafter, make_engine
from test_greedy_identity import MAX_TOKENS, PROMPTS, assert_matches_target_alone


def explore(chooser: StrategyChooser, rate: dict[bool, float]) -> list[bool]:
    """One exploration, recording `rate[mode]` tokens per second; returns the modes run."""
    modes = [chooser.next_mode() for _ in range(2 * chooser.window)]
    for mode in modes:
        chooser.record(mode, num_tokens=int(rate[mode]), seconds=1.0)
    return modes


def exploit(chooser: StrategyChooser) -> list[bool]:
    """The exploitation run that follows an exploration."""
    run = [chooser.next_mode()]  # the exploration's verdict sets the length of this run
    return run + [chooser.next_mode() for _ in range(chooser.window * chooser.exploit_windows - 1)]


def exploitation_runs(chooser: StrategyChooser, verdicts: list[dict[bool, float]]) -> list[tuple[bool, int]]:
    """(mode, length) of the exploitation after each exploration, which records `verdicts` in turn."""
    runs = []
    for rates in verdicts:
        assert explore(chooser, rates) == [True, True, False, False]
        run = exploit(chooser)
        assert len(set(run)) == 1
        runs.append((run[0], len(run)))
    return runs


def test_a_repeated_winner_earns_longer_exploitation_and_a_new_one_resets_it() -> None:
    chooser = StrategyChooser(window=2, exploit_windows=1, max_exploit_windows=4, explore_first=True)
    runs = exploitation_runs(chooser, [{True: 30, False: 10}] * 4 + [{True: 10, False: 11}])
    assert runs == [(True, 2), (True, 4), (True, 8), (True, 8), (False, 2)]  # doubled, capped, reset


def test_exploitation_grows_by_the_given_factor() -> None:
    chooser = StrategyChooser(window=2, exploit_windows=1, max_exploit_windows=32, explore_first=True, growth=4)
    runs = exploitation_runs(chooser, [{True: 12, False: 10}] * 4)
    assert runs == [(True, 2), (True, 8), (True, 32), (True, 64)]  # x4, capped at 32 windows of 2


def test_a_decisive_verdict_goes_straight_to_the_longest_exploitation() -> None:
    chooser = StrategyChooser(window=2, exploit_windows=1, max_exploit_windows=8, decisive=1.5)
    explore(chooser, {True: 10, False: 16})
    assert exploit(chooser) == [False] * 16


def test_explorations_alternate_the_strategies_in_blocks() -> None:
    """Blocks of `block` steps, so both strategies are timed under the same conditions (sequences
    early or late in their generations, requests coming and going) and not one before the other."""
    chooser = StrategyChooser(window=4, exploit_windows=1, block=2)
    assert explore(chooser, {True: 10, False: 20}) == [False, False, True, True] * 2
    assert exploit(chooser) == [False] * 4


def test_the_governor_compares_steps_per_sequence() -> None:
    """A step of 12 sequences in the bucket of 16 (9..16) counts 12/16 of its seconds: rates are
    those of a full bucket."""
    governor = SpeculationGovernor(window=1, exploit_windows=1)
    for batch_size, num_tokens in ((12, 12), (16, 24)):  # off at batch 12, then drafting at 16
        governor.record(batch_size, governor.draft_limit(batch_size), num_tokens, seconds=1.0)
    governor.draft_limit(16)  # the verdict
    assert governor.rates() == {16: {False: 16.0, True: 24.0}}


def test_the_governor_times_a_short_draft_length_against_the_full_one() -> None:
    """While drafting runs, a second chooser times the full length (first) against the short one
    and keeps the faster; on/off explorations draft at the length it prefers, the short one before
    its first verdict. Here drafting pays, and half the drafts pay more."""
    governor = SpeculationGovernor(short_limit=4, window=1, exploit_windows=1)
    limits = governed_limits(governor, {0: 10, None: 12, 4: 20})
    assert limits[:2] == [0, 4]  # the target alone first, then drafting at the short length
    assert None in limits  # the full length is timed too, while drafting runs
    assert None not in limits[limits.index(None) + 2:]  # once the short length won, drafting uses it
    assert limits[-8:] == [4] * 8
    assert governor.length_rates() == {16: {True: 12.0, False: 20.0}}


def test_the_full_length_wins_when_it_pays_more() -> None:
    """Drafting at the short length first; the full one, timed while drafting runs, takes over."""
    governor = SpeculationGovernor(short_limit=4, window=1, exploit_windows=1)
    limits = governed_limits(governor, {0: 10, None: 20, 4: 12})
    assert limits[:2] == [0, 4]
    assert limits[-8:] == [None] * 8
    assert governor.length_rates() == {16: {True: 20.0, False: 12.0}}


def governed_limits(governor: SpeculationGovernor, rate: dict, num_steps: int = 24) -> list:
    """The draft limits of `num_steps` steps of a batch of 16 whose tokens per second depend on it."""
    limits = []
    for _ in range(num_steps):
        limits.append(governor.draft_limit(16))
        governor.record(16, limits[-1], num_tokens=rate[limits[-1]], seconds=1.0)
    return limits


def governed_runs(governor: SpeculationGovernor, num_steps: int, drafting_rate: int, plain_rate: int) -> list:
    """Run lengths of the drafting decisions over `num_steps` steps of a batch of 16."""
    runs: list[list] = []
    for _ in range(num_steps):
        limit = governor.draft_limit(16)
        drafted = limit != 0
        governor.record(16, limit, num_tokens=drafting_rate if drafted else plain_rate, seconds=1.0)
        if runs and runs[-1][0] == drafted:
            runs[-1][1] += 1
        else:
            runs.append([drafted, 1])
    return [tuple(run) for run in runs]


@pytest.mark.parametrize(("plain_rate", "expected"), [
    # a new bucket times the target alone first; later explorations start with the incumbent
    (11, [(False, 1), (True, 1), (False, 3), (True, 1), (False, 9), (True, 1), (False, 33), (True, 1), (False, 129)]),
    (12, [(False, 1), (True, 1), (False, 3), (True, 1), (False, 129), (True, 1), (False, 129)]),  # settled at the repeat
    (13, [(False, 1), (True, 1), (False, 129), (True, 1), (False, 129)]),  # 1.3x: decisive, settled at once
])
def test_governor_settles_a_lost_cause_in_few_explorations(plain_rate, expected) -> None:
    """Drafting 10% slower: each confirming verdict quadruples the run without drafting. 20%
    slower: the repeated verdict settles it. 30% slower: the first one does."""
    governor = SpeculationGovernor(window=1, exploit_windows=2, max_exploit_windows=128)
    assert governed_runs(governor, sum(length for _, length in expected), 10, plain_rate) == expected


def test_re_explorations_start_with_the_incumbent() -> None:
    chooser = StrategyChooser(window=2, exploit_windows=1, explore_first=True)
    assert explore(chooser, {True: 10, False: 20}) == [True, True, False, False]  # no verdict yet
    assert exploit(chooser) == [False, False]
    assert explore(chooser, {True: 30, False: 20}) == [False, False, True, True]
    assert exploit(chooser) == [True, True]
    assert explore(chooser, {True: 30, False: 20}) == [True, True, False, False]


def test_governor_learns_each_batch_size_bucket_on_its_own() -> None:
    governor = SpeculationGovernor(window=1, exploit_windows=3)
    for batch_size, drafting_pays in ((1, True), (16, False)):
        for _ in range(2):  # one exploration: both modes once
            limit = governor.draft_limit(batch_size)
            governor.record(batch_size, limit, num_tokens=3 if (limit != 0) == drafting_pays else 1, seconds=1.0)
        assert [governor.draft_limit(batch_size) != 0 for _ in range(2)] == [drafting_pays] * 2
    assert governor.draft_limit(9) == 0  # 9..16 share the bucket of 16
    assert sorted(governor.rates()) == [1, 16]


@pytest.mark.parametrize("drafter", ["model-off", "ngram", "echo"])
@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_drafting_switched_on_and_off_keeps_the_output(tiny, reference, arch, drafter) -> None:
    models = tiny(arch)
    policy = Alternating()
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 3), 3)
    engine.governor = policy

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    off_steps = [num_tokens for drafted, num_tokens in policy.recorded if not drafted]
    assert off_steps and all(num_tokens <= len(PROMPTS) for num_tokens in off_steps)  # one token per sequence
    if drafter == "echo":  # drafting steps emit several tokens per sequence
        assert max(num_tokens for drafted, num_tokens in policy.recorded if drafted) > len(PROMPTS)


class OffFirst(Alternating):
    """Drafting off for the first `num_off` steps, then alternating."""

    def __init__(self, num_off: int) -> None:
        super().__init__()
        self.num_off = num_off

    def draft_limit(self, batch_size: int) -> int | None:
        self.num_off -= 1
        return 0 if self.num_off >= 0 else super().draft_limit(batch_size)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_a_draft_lm_prefills_a_sequence_at_its_first_drafting_step(tiny, reference, arch) -> None:
    """Governed off, a sequence costs the draft LM nothing; joining late changes no token."""
    models = tiny(arch)
    drafter = make_drafter("model-heuristic", models.target, models.draft, 3)
    engine = make_engine(models.target, drafter, 3)
    engine.governor = OffFirst(3)
    seqs = [engine.add_request(GenerationRequest(list(p), max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    for _ in range(4):  # admission, then three steps without drafting
        engine.step()
    assert drafter.runner.seq_ids == [] and drafter.draft_length == {}
    while engine.has_unfinished():
        engine.step()

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    assert sum(seq.stats.num_draft_tokens for seq in seqs) > 0


class Timed(Alternating):
    """Alternating, keeping the seconds of each recorded step."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def record(self, batch_size: int, draft_limit: int | None, num_tokens: int, seconds: float) -> None:
        super().record(batch_size, draft_limit, num_tokens, seconds)
        self.seconds.append(seconds)


def test_a_step_is_timed_from_the_end_of_the_last_one_but_not_across_idleness(tiny) -> None:
    """Between steps a server streams deltas and takes requests: that time belongs to the mode
    that stepped. Time with nothing to decode belongs to no step."""
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("echo", models.target, models.draft, 3), 3)
    engine.governor = policy = Timed()
    first = engine.add_request(GenerationRequest([5, 6, 7], max_tokens=32))
    engine.step()  # admission
    time.sleep(0.2)
    engine.step()
    assert policy.seconds[-1] >= 0.2
    engine.abort([first.seq_id])
    time.sleep(0.2)
    engine.add_request(GenerationRequest([5, 6, 7], max_tokens=32))
    engine.step()
    engine.step()
    assert policy.seconds[-1] < 0.2


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_is_not_timed_through_its_admissions(tiny, fused: bool) -> None:
    """A prefill costs the same whichever mode the step runs in: it must not decide a verdict.
    Prefilled in a forward of its own, it is left out of the step's time; prefilled in the
    verification's forward (fused), the step is left out."""
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("echo", models.target, models.draft, 3), 3)
    engine.governor = policy = Timed()
    engine.fused_prefill = fused
    prefill, verify_and_add = engine.verifier.add, engine.verifier.verify_and_add

    def slow_prefill(seqs):
        time.sleep(0.2)
        return prefill(seqs)

    def slow_verify_and_add(seqs, proposal, admitted):
        time.sleep(0.2 if admitted else 0)
        return verify_and_add(seqs, proposal, admitted)

    engine.add_request(GenerationRequest([5, 6, 7], max_tokens=32))
    engine.step()  # admission only
    engine.verifier.add, engine.verifier.verify_and_add = slow_prefill, slow_verify_and_add
    engine.add_request(GenerationRequest([8, 9], max_tokens=32))
    engine.step()  # admits the second while the first speculates
    assert len(policy.seconds) == (0 if fused else 1) and all(seconds < 0.2 for seconds in policy.seconds)
    engine.step()
    assert len(policy.seconds) == (1 if fused else 2) and policy.seconds[-1] < 0.2


class Limited(Alternating):
    def draft_limit(self, batch_size: int) -> int | None:
        return 1


def test_a_draft_limit_caps_greedy_sequences_only(tiny, reference) -> None:
    """A sampled sequence's draws follow its drafts: only greedy ones are cut to the limit."""
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("echo", models.target, models.draft, 3), 3)
    engine.governor = Limited()
    greedy = engine.add_request(GenerationRequest(list(PROMPTS[0]), max_tokens=MAX_TOKENS[0]))
    sampled = engine.add_request(GenerationRequest([5, 6, 7], SamplingParams(temperature=0.9, seed=1), max_tokens=16))
    while engine.has_unfinished():
        engine.step()
    assert 0 < greedy.stats.num_draft_tokens <= greedy.stats.num_steps  # at most one draft per step
    assert sampled.stats.num_draft_tokens > sampled.stats.num_steps
    assert_matches_target_alone(tiny, reference, "llama", [greedy], PROMPTS[:1], MAX_TOKENS[:1])


def test_sampled_sequences_are_never_governed(tiny) -> None:
    """Their random draws follow their drafts: the same seed gives the same text whatever the policy."""
    models = tiny("llama")
    sampled = [GenerationRequest([5, 6, 7], SamplingParams(temperature=0.9, seed=seed), max_tokens=16)
               for seed in (1, 2)]

    def run(policy):
        engine = make_engine(models.target, make_drafter("model-off", models.target, models.draft, 3), 3)
        engine.governor = policy
        return [seq.output_token_ids for seq in engine.generate(sampled + [GenerationRequest([9, 9], max_tokens=16)])]

    assert run(Alternating()) == run(None)


def test_an_unmeasured_strategy_keeps_the_exploration_going() -> None:
    """Steps that are not recorded (a drafter that is down) must not count as a slow strategy."""
    chooser = StrategyChooser(window=1, exploit_windows=1, explore_first=True)
    for mode in [chooser.next_mode() for _ in range(2)]:
        if not mode:
            chooser.record(mode, num_tokens=1, seconds=1.0)
    assert [chooser.next_mode() for _ in range(2)] == [True, False]  # explores again
    chooser.record(True, num_tokens=5, seconds=1.0)
    assert chooser.next_mode() is True and chooser.rates == {True: 5.0, False: 1.0}


def test_the_engine_flags_turn_load_aware_drafting_off() -> None:
    import argparse

    from dspark_ray.generate_cli import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args([])).load_aware_drafting is True
    assert engine_config_from_args(parser.parse_args(["--no-load-aware-drafting"])).load_aware_drafting is False
    assert engine_config_from_args(parser.parse_args([])).max_drafting_batch_size is None
    assert engine_config_from_args(parser.parse_args(["--max-drafting-batch-size", "8"])).max_drafting_batch_size == 8


def test_a_drafting_cap_turns_drafting_off_above_its_batch_size_and_defers_below() -> None:
    policy = Alternating()
    cap = DraftingCap(4, policy)
    assert [cap.draft_limit(5), cap.draft_limit(16)] == [0, 0] and policy.limits == []  # not consulted
    assert [cap.draft_limit(4), cap.draft_limit(1), cap.draft_limit(2)] == [None, 0, 2]  # the policy's cycle
    cap.record(16, 0, num_tokens=16, seconds=1.0)
    cap.record(4, None, num_tokens=9, seconds=1.0)
    assert policy.recorded == [(True, 9)]  # steps above the cap tell the policy nothing
    assert DraftingCap(4).draft_limit(4) is None and DraftingCap(4).draft_limit(5) == 0


def test_capped_drafting_keeps_the_output_and_drafts_only_below_the_cap(tiny, reference) -> None:
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("echo", models.target, models.draft, 3), 3)
    engine.governor = DraftingCap(2)
    seqs = [engine.add_request(GenerationRequest(list(prompt), max_tokens=n)) for prompt, n in zip(PROMPTS, MAX_TOKENS)]
    while engine.has_unfinished():
        engine.step()
    drafted = {n: seq.stats.num_draft_tokens for seq, n in zip(seqs, MAX_TOKENS)}
    assert [drafted[n] for n in (24, 29, 33)] == [0, 0, 0]  # they finish while more than 2 run
    assert drafted[36] > 0 and drafted[40] > 0
    assert_matches_target_alone(tiny, reference, "llama", seqs, PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("load_aware", [True, False])
def test_the_engine_config_puts_the_governor_under_the_cap(load_aware: bool) -> None:
    from dspark_ray.config import EngineConfig
    from dspark_ray.engine.factory import drafting_governor

    config = EngineConfig(drafter="model", load_aware_drafting=load_aware, max_drafting_batch_size=8)
    policy = drafting_governor(config)
    assert isinstance(policy, DraftingCap) and policy.max_batch_size == 8
    assert isinstance(policy.policy, SpeculationGovernor) if load_aware else policy.policy is None
    uncapped = drafting_governor(config.model_copy(update={"max_drafting_batch_size": None}))
    assert isinstance(uncapped, SpeculationGovernor) if load_aware else uncapped is None
    assert drafting_governor(config.model_copy(update={"drafter": "none"})) is None
