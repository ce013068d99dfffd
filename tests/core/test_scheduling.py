"""The prefix scheduler and the SPS curve (dspark_ray.core.scheduling): synthetic curves, ragged
rows, ties, brute-force optimality, and the prefix-independence that keeps sampling lossless."""

from __future__ import annotations

import itertools

import pytest
import torch

from dspark_ray.core.scheduling import (
    SpsCurve,
    monotone_survival,
    schedule_by_confidence,
    schedule_fixed,
    schedule_throughput,
)

FLAT = SpsCurve.from_measurements([1, 256], [100.0, 100.0])  # idle hardware: extra tokens are free
PROPORTIONAL = SpsCurve.from_measurements([1, 256], [100.0, 100.0 / 256])  # time grows with every token


def random_survival(generator: torch.Generator, batch: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    conditional = torch.rand(batch, width, generator=generator) ** 0.5  # [B, K]
    num_draft_tokens = torch.randint(0, width + 1, (batch,), generator=generator)
    return monotone_survival(conditional.cumprod(1), num_draft_tokens), num_draft_tokens


def brute_force(survival: torch.Tensor, num_draft_tokens: torch.Tensor, curve: SpsCurve,
                padded: bool = False) -> float:
    ranges = [range(int(n) + 1) for n in num_draft_tokens]
    return max(schedule_throughput(survival, torch.tensor(counts, dtype=torch.long), curve, padded).throughput
               for counts in itertools.product(*ranges))


def convex_curve(generator: torch.Generator, max_tokens: int) -> SpsCurve:
    base, slope, curvature = torch.rand(3, generator=generator).tolist()
    points = list(range(1, max_tokens + 1))
    return SpsCurve.from_measurements(points, [1.0 / (0.05 + base + 0.3 * slope * b + 0.05 * curvature * b * b)
                                               for b in points])


# SPS curve

def test_curve_interpolates_step_time_and_extrapolates_along_the_last_segment():
    curve = SpsCurve.from_measurements([1, 2, 4], [100.0, 50.0, 25.0])  # t = 0.01, 0.02, 0.04
    times = curve.step_time(torch.tensor([0.5, 1.0, 1.5, 3.0, 6.0]))
    torch.testing.assert_close(times, torch.tensor([0.01, 0.01, 0.015, 0.03, 0.06], dtype=torch.float64))
    assert float(curve.steps_per_second(2)) == pytest.approx(50.0)
    single = SpsCurve.from_measurements([8], [10.0])
    assert float(single.steps_per_second(100)) == pytest.approx(10.0)


def test_curve_never_rewards_bigger_batches():
    noisy = SpsCurve.from_measurements([1, 2, 4, 8, 8], [100.0, 120.0, 90.0, 80.0, 60.0])
    times = noisy.step_time_s
    assert bool((times[1:] >= times[:-1]).all())
    assert noisy.num_tokens.tolist() == [1, 2, 4, 8]  # duplicate B merged (mean step time)
    assert float(times[0]) == pytest.approx(float(times[1]))  # the violation 1 -> 2 pooled
    assert float(noisy.step_time(8)) == pytest.approx((1 / 80 + 1 / 60) / 2)


def test_curve_round_trips_and_rejects_nonsense():
    curve = SpsCurve.linear(0.01, 0.001, max_tokens=64)
    again = SpsCurve.from_dict(curve.to_dict())
    torch.testing.assert_close(again.step_time_s, curve.step_time_s)
    assert curve.num_tokens.tolist() == [1, 2, 4, 8, 16, 32, 64]
    for tokens, sps in [([], []), ([1, 2], [1.0]), ([0], [1.0]), ([1], [0.0]), ([1], [float("inf")])]:
        with pytest.raises(ValueError):
            SpsCurve.from_measurements(tokens, sps)


# Scheduler on synthetic curves

def test_flat_curve_verifies_every_draft():
    survival = torch.tensor([[0.9, 0.5, 0.1, 0.01], [0.3, 0.2, 0.0, 0.0]])
    schedule = schedule_by_confidence(survival, torch.tensor([4, 2]), FLAT)
    assert schedule.num_verify_tokens.tolist() == [4, 2]
    assert schedule.num_batch_tokens == 8
    assert schedule.expected_tokens == pytest.approx(2 + 1.51 + 0.5)


def test_time_proportional_to_tokens_verifies_no_uncertain_draft():
    survival = torch.tensor([[0.99, 0.9, 0.5], [0.999, 0.99, 0.98]])
    schedule = schedule_by_confidence(survival, torch.tensor([3, 3]), PROPORTIONAL)
    assert schedule.num_verify_tokens.tolist() == [0, 0]
    assert schedule.num_batch_tokens == 2  # the mandatory position of each request remains
    certain = schedule_by_confidence(torch.tensor([[1.0, 1.0, 0.5]]), torch.tensor([3]), PROPORTIONAL)
    assert certain.num_verify_tokens.tolist() == [0]  # a sure token adds as much time as output: no gain


def test_load_shortens_prefixes():
    """The same drafts on a moderately loaded curve: long prefixes for a few requests, short ones
    for many (each request competes for the same tokens)."""
    curve = SpsCurve.linear(0.02, 0.001, max_tokens=512)  # ~20 tokens cost as much as the fixed overhead
    row = torch.tensor([0.95, 0.9, 0.8, 0.65, 0.5, 0.35, 0.2, 0.1])
    lengths = {}
    for batch in (1, 8, 64):
        schedule = schedule_by_confidence(row.repeat(batch, 1), torch.full((batch,), 8), curve)
        lengths[batch] = schedule.num_verify_tokens.float().mean().item()
        assert bool((schedule.num_verify_tokens == schedule.num_verify_tokens[0]).all())
    assert lengths[1] > lengths[8] > lengths[64] >= 0
    assert lengths[1] == 7  # the last draft (0.1) would add 1/28 of a step's time for 1/55 more tokens


def test_ragged_rows_and_empty_inputs():
    survival = torch.tensor([[0.9, 0.8, 0.7], [0.95, 5.0, 0.99], [0.0, 0.0, 0.0]])  # row 1 padded junk
    schedule = schedule_by_confidence(survival, torch.tensor([3, 1, 0]), FLAT)
    assert schedule.num_verify_tokens.tolist() == [3, 1, 0]
    assert schedule.num_batch_tokens == 3 + 4
    empty = schedule_by_confidence(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), PROPORTIONAL)
    assert empty.num_verify_tokens.tolist() == [0, 0] and empty.num_batch_tokens == 2
    none = schedule_by_confidence(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), FLAT)
    assert none.num_verify_tokens.tolist() == [] and none.throughput == 0.0


def test_non_monotone_input_is_treated_as_its_running_minimum():
    survival = torch.tensor([[0.9, 0.2, 0.8]])
    assert monotone_survival(survival, torch.tensor([3]))[0].tolist() == pytest.approx([0.9, 0.2, 0.2])


def test_ties_admit_lower_positions_then_lower_rows_first():
    # Theta = 2 * 1.0, then 2.5 * 0.9 = 2.25, then 3 * 0.7 = 2.1: exactly one extra token pays off,
    # so the tie-break decides which one.
    curve = SpsCurve.from_measurements([2, 3, 4], [1.0, 0.9, 0.7])
    survival = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    schedule = schedule_by_confidence(survival, torch.tensor([2, 2]), curve)
    assert schedule.num_verify_tokens.tolist() == [1, 0]
    flat = schedule_by_confidence(survival, torch.tensor([2, 2]), FLAT)
    assert flat.num_verify_tokens.tolist() == [2, 2]


def test_padded_batches_get_one_cap_for_every_row():
    survival = torch.tensor([[0.99, 0.95, 0.9, 0.2], [0.3, 0.1, 0.05, 0.01], [0.9, 0.8, 0.0, 0.0]])
    num_draft_tokens = torch.tensor([4, 4, 2])
    assert schedule_by_confidence(survival, num_draft_tokens, FLAT, padded=True).num_verify_tokens.tolist() == [4, 4, 2]
    none = schedule_by_confidence(survival, num_draft_tokens, PROPORTIONAL, padded=True)
    assert none.num_verify_tokens.tolist() == [0, 0, 0] and none.num_batch_tokens == 3
    curve = SpsCurve.linear(0.02, 0.001, max_tokens=64)
    schedule = schedule_by_confidence(survival, num_draft_tokens, curve, padded=True)
    cap = int(schedule.num_verify_tokens.max())
    assert schedule.num_verify_tokens.tolist() == num_draft_tokens.clamp(max=cap).tolist()
    assert schedule.num_batch_tokens == 3 * (1 + cap)
    fixed = schedule_fixed(survival, num_draft_tokens, curve, length=3, padded=True)
    assert fixed.num_batch_tokens == 3 * 4


def test_fixed_mode_verifies_min_of_draft_and_length():
    survival = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.0, 0.0]])
    fixed = schedule_fixed(survival, torch.tensor([3, 1]), PROPORTIONAL, length=2)
    assert fixed.num_verify_tokens.tolist() == [2, 1]
    assert fixed.expected_tokens == pytest.approx(2 + 0.9 + 0.8 + 0.9)
    assert schedule_fixed(survival, torch.tensor([3, 1]), PROPORTIONAL).num_verify_tokens.tolist() == [3, 1]


@pytest.mark.parametrize("seed", range(30))
def test_greedy_is_optimal_on_convex_step_times(seed):
    """Exact for any nondecreasing convex step time (see the module docstring): brute force over
    every combination of prefix lengths agrees."""
    generator = torch.Generator().manual_seed(seed)
    batch, width = int(torch.randint(1, 4, (1,), generator=generator)), int(torch.randint(1, 5, (1,), generator=generator))
    survival, num_draft_tokens = random_survival(generator, batch, width)
    curve = convex_curve(generator, batch * (width + 1) + 1)
    for padded in (False, True):
        schedule = schedule_by_confidence(survival, num_draft_tokens, curve, padded=padded)
        assert bool((schedule.num_verify_tokens <= num_draft_tokens).all())
        assert schedule.throughput == pytest.approx(brute_force(survival, num_draft_tokens, curve, padded), rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_on_any_monotone_curve_greedy_stops_at_the_first_peak_of_its_path(seed):
    """A step-shaped (non-convex) curve can hide a second peak: early stopping may then be below
    the brute-force optimum, never below verifying drafts up to its own stopping point would give,
    and never below verifying no drafts at all."""
    generator = torch.Generator().manual_seed(100 + seed)
    survival, num_draft_tokens = random_survival(generator, 3, 4)
    points = list(range(1, 16))
    times = torch.rand(len(points), generator=generator).cumsum(0).tolist()  # monotone, arbitrary shape
    curve = SpsCurve.from_measurements(points, [1.0 / t for t in times])
    schedule = schedule_by_confidence(survival, num_draft_tokens, curve)
    nothing = schedule_throughput(survival, torch.zeros(3, dtype=torch.long), curve).throughput
    assert nothing <= schedule.throughput <= brute_force(survival, num_draft_tokens, curve) + 1e-12
    for row in range(3):  # one more draft for any row, or one fewer, does not help
        for delta in (-1, 1):
            counts = schedule.num_verify_tokens.clone()
            counts[row] += delta
            if 0 <= counts[row] <= num_draft_tokens[row]:
                assert schedule_throughput(survival, counts, curve).throughput <= schedule.throughput + 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_whether_a_draft_is_verified_never_depends_on_later_positions_of_its_row(seed):
    """The property sampling losslessness needs: the survival of positions > j (which depends on
    the drafted token x_j) cannot change whether positions <= j are verified."""
    generator = torch.Generator().manual_seed(200 + seed)
    survival, num_draft_tokens = random_survival(generator, 4, 6)
    curve = SpsCurve.linear(0.01, float(torch.rand(1, generator=generator)) * 0.004, max_tokens=64)
    for padded in (False, True):
        before = schedule_by_confidence(survival, num_draft_tokens, curve, padded=padded).num_verify_tokens
        for row in range(4):
            for position in range(int(num_draft_tokens[row])):
                changed = survival.clone()
                changed[row, position + 1:] = survival[row, position] * torch.rand(
                    6 - position - 1, generator=generator, dtype=torch.float64)
                after = schedule_by_confidence(changed, num_draft_tokens, curve, padded=padded).num_verify_tokens
                assert min(int(after[row]), position + 1) == min(int(before[row]), position + 1)
