"""The speculative verification rule (dspark_ray.core.verification): tables, exact analytic proof
that it is lossless, Monte-Carlo checks of `verify` end to end, and determinism."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from dspark_ray.core import verification
from dspark_ray.core.sampling import SamplingParams, SamplingTensors, logits_to_probs, make_generator
from dspark_ray.core.verification import (
    PLACEHOLDER_TOKEN_ID,
    VerificationResult,
    acceptance_probs,
    recovered_probs,
    verify,
)

V = 8  # vocabulary of the table cases
GREEDY = SamplingParams()
P = PLACEHOLDER_TOKEN_ID


def logits_with_argmax(argmax_ids: list[int], vocab_size: int = V, seed: int = 0) -> torch.Tensor:  # [T, V]
    """Random logits in [0, 1) whose argmax at position t is argmax_ids[t]."""
    logits = torch.rand(len(argmax_ids), vocab_size, generator=make_generator(seed))
    logits[torch.arange(len(argmax_ids)), argmax_ids] = 5.0
    return logits


def peaked_logits(token_ids: list[int], vocab_size: int = V) -> torch.Tensor:  # [T, V]
    """Logits whose softmax is exactly one-hot (other tokens -inf), for deterministic sampled rows."""
    logits = torch.full((len(token_ids), vocab_size), -math.inf)
    logits[torch.arange(len(token_ids)), token_ids] = 0.0
    return logits


def run_greedy(draft: list[int], target_argmax: list[int]) -> VerificationResult:
    """One greedy row, K = len(draft), draft_probs None."""
    return verify(
        draft_token_ids=torch.tensor([draft], dtype=torch.int64).reshape(1, len(draft)),
        num_draft_tokens=torch.tensor([len(draft)]),
        draft_probs=None,
        target_logits=logits_with_argmax(target_argmax)[None],
        sampling=SamplingTensors.from_params([GREEDY]),
        generators=[None],
    )


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize(
    "case, draft, target_argmax, expected_output, expected_accepted",
    [
        ("all accepted + bonus", [3, 1, 4], [3, 1, 4, 2], [3, 1, 4, 2], 3),
        ("first-token mismatch", [3, 1, 4], [5, 1, 4, 2], [5, P, P, P], 0),
        ("middle mismatch", [3, 1, 4], [3, 6, 4, 2], [3, 6, P, P], 1),
        ("last mismatch", [3, 1, 4], [3, 1, 0, 2], [3, 1, 0, P], 2),
        ("empty draft", [], [7], [7], 0),
    ],
)
def test_greedy_table(case, draft, target_argmax, expected_output, expected_accepted):
    result = run_greedy(draft, target_argmax)
    assert result.output_token_ids.tolist() == [expected_output], case
    assert result.num_accepted.tolist() == [expected_accepted], case
    assert result.acceptance_length.tolist() == [expected_accepted + 1]
    assert result.tokens(0) == [t for t in expected_output if t != P]
    assert result.output_token_ids.dtype == torch.int64 and result.num_accepted.dtype == torch.int64


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_empty_draft_with_sampling_samples_one_target_token(with_draft_probs):
    result = verify(
        draft_token_ids=torch.zeros(1, 2, dtype=torch.int64),
        num_draft_tokens=torch.tensor([0]),
        draft_probs=torch.full((1, 2, V), 1.0 / V) if with_draft_probs else None,  # no draft: not needed
        target_logits=peaked_logits([6, 1, 2])[None],
        sampling=SamplingTensors.from_params([SamplingParams(temperature=1.0)]),
        generators=[make_generator(0)],
    )
    assert result.output_token_ids.tolist() == [[6, P, P]] and result.num_accepted.tolist() == [0]


def test_no_draft_slots_at_all():
    """K = 0 (the engine's target-only step): every row emits one target token."""
    result = verify(
        draft_token_ids=torch.zeros(2, 0, dtype=torch.int64),
        num_draft_tokens=torch.tensor([0, 0]),
        draft_probs=None,
        target_logits=torch.stack([logits_with_argmax([4]), peaked_logits([2])]),
        sampling=SamplingTensors.from_params([GREEDY, SamplingParams(temperature=0.5)]),
        generators=[None, make_generator(0)],
    )
    assert result.output_token_ids.tolist() == [[4], [2]] and result.num_accepted.tolist() == [0, 0]


def test_sampled_table_rejection_and_bonus_are_exact_when_distributions_are_one_hot():
    sampled = SamplingParams(temperature=1.0)
    draft_probs = torch.softmax(peaked_logits([2, 5]), -1)  # [K, V]: the draft put all its mass on 2 then 5
    # Row 0: the target agrees at both positions, so both are accepted, then the bonus is 7.
    # Row 1: the target gives token 2 zero mass: rejected; the residual is one-hot at 4: recovered 4.
    result = verify(
        draft_token_ids=torch.tensor([[2, 5], [2, 5]]),
        num_draft_tokens=torch.tensor([2, 2]),
        draft_probs=torch.stack([draft_probs, draft_probs]),
        target_logits=torch.stack([peaked_logits([2, 5, 7]), peaked_logits([4, 5, 7])]),
        sampling=SamplingTensors.from_params([sampled, sampled]),
        generators=[make_generator(0), make_generator(1)],
    )
    assert result.output_token_ids.tolist() == [[2, 5, 7], [4, P, P]]
    assert result.num_accepted.tolist() == [2, 0]


def random_ragged_batch(seed: int, garbage_seed: int):
    """3 rows, K = 4, lengths 4 / 1 / 0; everything past num_draft_tokens comes from garbage_seed."""
    generator, garbage = make_generator(seed), make_generator(garbage_seed)
    num_draft_tokens = torch.tensor([4, 1, 0])
    draft_token_ids = torch.randint(0, V, (3, 4), generator=garbage)  # [B, K]
    draft_probs = torch.rand(3, 4, V, generator=garbage)  # [B, K, V]
    target_logits = 3.0 * torch.randn(3, 5, V, generator=garbage)  # [B, K+1, V]
    for row, count in enumerate(num_draft_tokens.tolist()):
        draft_logits = torch.randn(count, V, generator=generator)
        draft_probs[row, :count] = draft_logits.softmax(-1)
        draft_token_ids[row, :count] = torch.multinomial(draft_probs[row, :count], 1, generator=generator)[:, 0]
        target_logits[row, : count + 1] = torch.randn(count + 1, V, generator=generator)
    draft_probs[1, 2] = math.nan  # garbage may be anything, NaN included
    return draft_token_ids, num_draft_tokens, draft_probs, target_logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ragged_batch_ignores_everything_past_num_draft_tokens(temperature):
    sampling = SamplingTensors.from_params([SamplingParams(temperature=temperature)] * 3)
    results = []
    for garbage_seed in (10, 11, 12):
        inputs = random_ragged_batch(seed=3, garbage_seed=garbage_seed)
        results.append(verify(*inputs, sampling, [make_generator(s) for s in (0, 1, 2)]))
    for other in results[1:]:
        assert torch.equal(results[0].output_token_ids, other.output_token_ids)
        assert torch.equal(results[0].num_accepted, other.num_accepted)
    # Each row also equals that row verified alone with no padding at all (K = its own length).
    draft_token_ids, num_draft_tokens, draft_probs, target_logits = random_ragged_batch(3, 10)
    for row, count in enumerate(num_draft_tokens.tolist()):
        alone = verify(
            draft_token_ids[row : row + 1, :count],
            num_draft_tokens[row : row + 1],
            draft_probs[row : row + 1, :count],
            target_logits[row : row + 1, : count + 1],
            SamplingTensors.from_params([SamplingParams(temperature=temperature)]),
            [make_generator(row)],
        )
        assert alone.tokens(0) == results[0].tokens(row)


def test_greedy_and_sampled_rows_mix_in_one_call():
    draft_token_ids = torch.tensor([[3, 1, 4], [3, 1, 4], [2, 5, 0], [6, 6, 6]])
    target_logits = torch.stack(
        [
            logits_with_argmax([3, 1, 4, 2]),  # greedy: all accepted + bonus 2
            logits_with_argmax([3, 6, 4, 2]),  # greedy: middle mismatch, recovered 6
            peaked_logits([2, 5, 0, 7]),  # sampled, target one-hot on the draft: all accepted + bonus 7
            peaked_logits([6, 3, 0, 0]),  # sampled, draft token 6 has target mass 0 at position 1
        ]
    )
    draft_probs = torch.full((4, 3, V), 1.0 / V)
    draft_probs[2] = torch.softmax(peaked_logits([2, 5, 0]), -1)
    greedy_draft_probs_are_ignored = torch.full((V,), math.nan)
    draft_probs[0, 0] = greedy_draft_probs_are_ignored
    sampled = SamplingParams(temperature=1.0, top_k=3)
    result = verify(
        draft_token_ids,
        torch.tensor([3, 3, 3, 2]),
        draft_probs,
        target_logits,
        SamplingTensors.from_params([GREEDY, GREEDY, sampled, sampled]),
        [None, None, make_generator(0), make_generator(1)],
    )
    assert result.output_token_ids.tolist()[:3] == [[3, 1, 4, 2], [3, 6, P, P], [2, 5, 0, 7]]
    # Row 3: 6 accepted with probability 1 (target one-hot at 6), then 6 rejected (mass 0): recovered 3.
    assert result.output_token_ids.tolist()[3] == [6, 3, P, P]
    assert result.num_accepted.tolist() == [3, 1, 3, 1]


def test_verify_does_not_mutate_inputs():
    inputs = random_ragged_batch(seed=4, garbage_seed=5)
    copies = [t.clone() for t in inputs]
    sampling = SamplingTensors.from_params([SamplingParams(temperature=0.8, top_p=0.9), GREEDY, GREEDY])
    verify(*inputs, sampling, [make_generator(0), None, None])
    for before, after in zip(copies, inputs):
        assert torch.equal(before.isnan(), after.isnan())
        assert torch.equal(before.nan_to_num(), after.nan_to_num())


def test_verify_checks_its_inputs():
    inputs = random_ragged_batch(seed=4, garbage_seed=5)
    sampled = SamplingTensors.from_params([SamplingParams(temperature=1.0)] * 3)
    generators = [None] * 3
    with pytest.raises(ValueError, match="draft_probs may be None"):
        verify(inputs[0], inputs[1], None, inputs[3], sampled, generators)
    with pytest.raises(ValueError):
        verify(inputs[0], torch.tensor([5, 0, 0]), inputs[2], inputs[3], sampled, generators)
    with pytest.raises(ValueError):
        verify(inputs[0], inputs[1], inputs[2], inputs[3][:, :4], sampled, generators)
    with pytest.raises(ValueError):
        verify(inputs[0], inputs[1], inputs[2], inputs[3], sampled, generators[:2])


def test_make_dummy_and_tokens():
    result = VerificationResult.make_dummy([[5, 7], [3]], num_speculative_tokens=2)
    assert result.output_token_ids.tolist() == [[5, 7, P], [3, P, P]]
    assert result.num_accepted.tolist() == [1, 0]
    assert result.tokens(0) == [5, 7] and result.tokens(1) == [3]


# ---------------------------------------------------------------- helpers


def test_acceptance_probs_is_min_one_ratio_and_never_accepts_a_token_the_target_forbids():
    draft = torch.tensor([0.5, 0.2, 0.1, 0.0, 0.0])
    target = torch.tensor([0.25, 0.4, 0.0, 0.3, 0.0])
    assert torch.allclose(acceptance_probs(draft, target), torch.tensor([0.5, 1.0, 0.0, 1.0, 0.0]))


def test_recovered_probs_is_the_normalised_residual_and_falls_back_when_it_is_empty():
    draft = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    target = torch.tensor([[0.2, 0.4, 0.4], [0.2, 0.3, 0.5]])
    expected = torch.tensor([[0.0, 1 / 3, 2 / 3], [0.2, 0.3, 0.5]])  # row 1: draft == target
    assert torch.allclose(recovered_probs(draft, target), expected)


# ---------------------------------------------------------------- exact analytic check


def emitted_distribution(
    draft_probs: torch.Tensor,  # [V]: where the draft token at this position is sampled from
    target_probs: torch.Tensor,  # [V]: processed target at this position
    recover=recovered_probs,
) -> torch.Tensor:  # [V] float64
    """Exact probability of each token at one output position, given the prefix before it was accepted.

    P(y) = sum_x draft(x) accept(x) [x = y]  +  P(reject) recovered(y),
    P(reject) = 1 - sum_x draft(x) accept(x), with the same helpers `verify` uses.
    """
    accepted_mass = draft_probs * acceptance_probs(draft_probs, target_probs)  # [V]
    rejected_mass = 1.0 - accepted_mass.sum()
    return (accepted_mass + rejected_mass * recover(draft_probs, target_probs)).double()


ANALYTIC_PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=4, top_p=0.9, min_p=0.05),
]


def random_processed(shape, params: SamplingParams, generator, scale=2.0) -> torch.Tensor:  # [..., V]
    logits = scale * torch.randn(*shape, generator=generator)
    return logits_to_probs(logits.reshape(1, -1, shape[-1]), SamplingTensors.from_params([params])).reshape(shape)


@pytest.mark.parametrize("params", ANALYTIC_PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("draft_processed", [True, False], ids=["draft-processed", "draft-raw"])
def test_exact_output_distribution_equals_processed_target(params, seed, draft_processed):
    """K = 2, V = 5; position 1 depends on the token accepted at position 0 (as a real model does).

    Output position 0 must be distributed as target_probs[0]; output position 1, given draft token
    x0 was accepted, as target_probs[1 | x0]; position 2 (the bonus) is target_probs[2 | x0, x1]
    by construction. K = 1 is the same check at position 0 followed by the bonus.
    """
    generator, vocab_size = make_generator(seed), 5
    draft_params = params if draft_processed else SamplingParams(temperature=1.0)
    target_probs_0 = random_processed((vocab_size,), params, generator)  # [V]
    target_probs_1 = random_processed((vocab_size, vocab_size), params, generator)  # [x0, V]
    draft_probs_0 = random_processed((vocab_size,), draft_params, generator)  # [V]
    draft_probs_1 = random_processed((vocab_size, vocab_size), draft_params, generator)  # [x0, V]

    first = emitted_distribution(draft_probs_0, target_probs_0)
    assert torch.allclose(first, target_probs_0.double(), atol=1e-6, rtol=0)
    for x0 in range(vocab_size):
        second = emitted_distribution(draft_probs_1[x0], target_probs_1[x0])
        assert torch.allclose(second, target_probs_1[x0].double(), atol=1e-6, rtol=0), x0


def test_exact_check_catches_a_wrong_rule():
    """Sampling the recovered token from target_probs instead of the residual is not lossless."""
    generator, vocab_size = make_generator(0), 5
    for params in ANALYTIC_PARAMS:
        target_probs = random_processed((vocab_size,), params, generator)
        draft_probs = random_processed((vocab_size,), SamplingParams(temperature=1.0), generator)
        wrong = emitted_distribution(draft_probs, target_probs, recover=lambda draft, target: target)
        assert (wrong - target_probs.double()).abs().max() > 1e-3


def test_every_accept_reject_path_sums_to_the_target_for_k_equals_2():
    """The joint of the first two output tokens over all paths (accept/reject at each position)."""
    generator, vocab_size, params = make_generator(9), 5, ANALYTIC_PARAMS[3]
    target_probs_0 = random_processed((vocab_size,), params, generator)  # [V]
    target_probs_1 = random_processed((vocab_size, vocab_size), params, generator)  # [x0, V]
    draft_probs_0 = random_processed((vocab_size,), SamplingParams(temperature=1.0), generator)  # [V]
    draft_probs_1 = random_processed((vocab_size, vocab_size), SamplingParams(temperature=1.0), generator)
    accept_0 = acceptance_probs(draft_probs_0, target_probs_0).double()  # [V]
    reject_0 = 1.0 - (draft_probs_0 * accept_0).sum()
    joint = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)  # [y0, y1]
    for y0, y1 in itertools.product(range(vocab_size), repeat=2):
        # y0 accepted in this step, y1 from the rest of this step...
        via_accept = draft_probs_0[y0] * accept_0[y0] * emitted_distribution(draft_probs_1[y0], target_probs_1[y0])[y1]
        # ...or y0 recovered, and y1 is the first token of the next step (a fresh, exact step).
        via_reject = reject_0 * recovered_probs(draft_probs_0, target_probs_0)[y0] * target_probs_1[y0, y1]
        joint[y0, y1] = via_accept + via_reject
    expected = target_probs_0.double()[:, None] * target_probs_1.double()  # [y0, y1]
    assert torch.allclose(joint, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- Monte Carlo through verify

MC_TRIALS = 20_000
MC_PARAMS = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)


def monte_carlo_run(trials: int = MC_TRIALS, seed: int = 0):
    """`trials` rows, K = 2, V = 5: drafts sampled from draft_probs, verified in one call.

    Target and draft at position 1 depend on x0, the target at position 2 on (x0, x1).
    """
    generator, vocab_size = make_generator(seed), 5
    tables = make_generator(1234)  # the same distributions for every seed
    target_0 = 2.0 * torch.randn(vocab_size, generator=tables)  # [V]
    target_1 = 2.0 * torch.randn(vocab_size, vocab_size, generator=tables)  # [x0, V]
    target_2 = 2.0 * torch.randn(vocab_size, vocab_size, vocab_size, generator=tables)  # [x0, x1, V]
    draft_0 = 2.0 * torch.randn(vocab_size, generator=tables)
    draft_1 = 2.0 * torch.randn(vocab_size, vocab_size, generator=tables)
    draft_sampling = SamplingTensors.from_params([SamplingParams(temperature=1.0)])
    draft_probs_0 = logits_to_probs(draft_0.reshape(1, 1, -1), draft_sampling)[0, 0]  # [V]
    draft_probs_1 = logits_to_probs(draft_1[None], draft_sampling)[0]  # [x0, V]

    x0 = torch.multinomial(draft_probs_0, trials, replacement=True, generator=generator)  # [N]
    x1 = torch.multinomial(draft_probs_1[x0], 1, generator=generator)[:, 0]  # [N]
    draft_probs = torch.stack([draft_probs_0.expand(trials, -1), draft_probs_1[x0]], dim=1)  # [N, 2, V]
    target_logits = torch.stack([target_0.expand(trials, -1), target_1[x0], target_2[x0, x1]], dim=1)
    sampling = SamplingTensors.from_params([MC_PARAMS] * trials)
    result = verify(
        draft_token_ids=torch.stack([x0, x1], dim=1),
        num_draft_tokens=torch.full((trials,), 2),
        draft_probs=draft_probs,
        target_logits=target_logits,
        sampling=sampling,
        generators=[generator] * trials,  # one shared stream: every draw is still used once
    )
    return result, logits_to_probs(target_logits, sampling), draft_probs  # [N, 3, V], [N, 2, V]


def chi_square_p_values(result: VerificationResult, target_probs: torch.Tensor) -> list[float]:
    """For output positions 0, 1, 2: rows that reached it, observed tokens vs. the target there.

    Given its prefix was accepted, a row's token at position j follows its own target_probs[j]
    (conditioned on that prefix); the expected counts sum those rows' distributions. Emitting a
    token the target gives mass 0 is an outright failure: p-value 0.
    """
    p_values = []
    for position in range(3):
        reached = result.num_accepted >= position  # [N]
        tokens = result.output_token_ids[reached, position]
        observed = torch.bincount(tokens, minlength=target_probs.shape[-1]).double()
        expected = target_probs[reached, position].double().sum(0)
        impossible = expected < 1e-9
        if observed[impossible].sum() > 0:
            p_values.append(0.0)
            continue
        observed, expected = observed[~impossible], expected[~impossible]
        expected *= observed.sum() / expected.sum()  # float rounding only: both count the same rows
        p_values.append(float(chisquare(observed.numpy(), expected.numpy()).pvalue))
    return p_values


@pytest.fixture(scope="module")
def correct_monte_carlo():
    """The unpatched run, shared (read-only) by the tests that need it; buggy runs make their own."""
    return monte_carlo_run()


def test_monte_carlo_verify_matches_target_at_every_output_position(correct_monte_carlo):
    result, target_probs, _ = correct_monte_carlo
    reached = [(result.num_accepted >= j).sum().item() for j in range(3)]
    assert reached[1] > 3000 and reached[2] > 1000, reached  # every position sees enough rows
    p_values = chi_square_p_values(result, target_probs)
    assert min(p_values) > 1e-3, p_values
    assert set(result.num_accepted.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "bug, replacement",
    [
        ("recovered from target, not the residual", lambda module: lambda draft, target: target),
        ("acceptance ratio upside down", lambda module: lambda draft, target: module(target, draft)),
    ],
)
def test_monte_carlo_rejects_a_buggy_rule(monkeypatch, bug, replacement):
    name = "recovered_probs" if "recovered" in bug else "acceptance_probs"
    monkeypatch.setattr(verification, name, replacement(getattr(verification, name)))
    result, target_probs, _ = monte_carlo_run(trials=MC_TRIALS // 4)  # these bugs are gross
    assert min(chi_square_p_values(result, target_probs)) < 1e-6, bug


def test_monte_carlo_rejects_a_bonus_taken_from_draft_probs(correct_monte_carlo):
    """The bug emulated on verify's output: every bonus re-drawn from the last draft distribution."""
    result, target_probs, draft_probs = correct_monte_carlo
    all_accepted = result.num_accepted == 2  # [N]
    wrong_bonus = torch.multinomial(draft_probs[all_accepted, 1], 1, generator=make_generator(5))[:, 0]
    output = result.output_token_ids.clone()
    output[all_accepted, 2] = wrong_bonus
    buggy = VerificationResult(output_token_ids=output, num_accepted=result.num_accepted)
    p_values = chi_square_p_values(buggy, target_probs)
    assert p_values[2] < 1e-6 and min(p_values[:2]) > 1e-3, p_values


# ---------------------------------------------------------------- determinism


def determinism_batch(seed: int, batch_size: int):
    generator = make_generator(seed)
    draft_probs = torch.softmax(torch.randn(batch_size, 3, V, generator=generator), -1)  # [B, K, V]
    draft_token_ids = torch.multinomial(draft_probs.reshape(-1, V), 1, generator=generator).reshape(batch_size, 3)
    target_logits = torch.randn(batch_size, 4, V, generator=generator)  # [B, K+1, V]
    return draft_token_ids, draft_probs, target_logits


def test_same_seeds_give_identical_results():
    draft_token_ids, draft_probs, target_logits = determinism_batch(0, 64)
    sampling = SamplingTensors.from_params([SamplingParams(temperature=1.0)] * 64)
    runs = [
        verify(draft_token_ids, torch.full((64,), 3), draft_probs, target_logits, sampling,
               [make_generator(1000 + b) for b in range(64)])
        for _ in range(2)
    ]
    assert torch.equal(runs[0].output_token_ids, runs[1].output_token_ids)
    assert 0 < runs[0].num_accepted.float().mean() < 3  # both accepts and rejects happened


def test_a_rows_result_does_not_depend_on_the_other_rows():
    draft_token_ids, draft_probs, target_logits = determinism_batch(0, 4)
    params = SamplingParams(temperature=0.9, top_k=6)

    def row_two(batch_seed: int, other_params: SamplingParams, other_counts: list[int]):
        ids, probs, logits = determinism_batch(batch_seed, 4)
        ids[2], probs[2], logits[2] = draft_token_ids[2], draft_probs[2], target_logits[2]
        sampling = SamplingTensors.from_params([other_params, other_params, params, other_params])
        generators = [make_generator(batch_seed + b) for b in range(4)]
        generators[2] = make_generator(77)
        counts = torch.tensor(other_counts[:2] + [3] + other_counts[2:])
        return verify(ids, counts, probs, logits, sampling, generators).tokens(2)

    reference = row_two(0, params, [3, 3, 3])
    assert row_two(1, SamplingParams(temperature=0.3), [0, 2, 1]) == reference
    assert row_two(2, GREEDY, [1, 3, 0]) == reference
    alone = verify(draft_token_ids[2:3], torch.tensor([3]), draft_probs[2:3], target_logits[2:3],
                   SamplingTensors.from_params([params]), [make_generator(77)])
    assert alone.tokens(0) == reference


def test_all_greedy_fast_path_matches_the_general_rule():
    """A batch of greedy rows takes a shortcut; adding one sampled row forces the general rule,
    which must give the greedy rows exactly the same output (including argmax ties)."""
    torch.manual_seed(3)
    batch, max_draft, vocab = 6, 4, 7
    target_logits = torch.randint(0, 3, (batch, max_draft + 1, vocab)).float()  # many ties
    draft_ids = target_logits.argmax(-1)[:, :max_draft].clone()
    draft_ids[::2, 1] = (draft_ids[::2, 1] + 1) % vocab  # mismatches in some rows
    num_draft = torch.tensor([4, 0, 2, 4, 1, 3])
    greedy = SamplingTensors.from_params([SamplingParams()] * batch)
    fast = verify(draft_ids, num_draft, None, target_logits, greedy, [None] * batch)

    sampled_row = SamplingParams(temperature=1.0, seed=0)
    mixed = SamplingTensors.from_params([SamplingParams()] * batch + [sampled_row])
    general = verify(
        torch.cat([draft_ids, draft_ids[:1]]), torch.cat([num_draft, torch.tensor([0])]), None,
        torch.cat([target_logits, target_logits[:1]]), mixed, [None] * batch + [make_generator(0)],
    )
    assert torch.equal(fast.output_token_ids, general.output_token_ids[:batch])
    assert torch.equal(fast.num_accepted, general.num_accepted[:batch])
