"""Tables for logits processing, sampling and generators (dspark_ray.core.sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from dspark_ray.core.sampling import (
    MAX_SEED,
    SamplingParams,
    SamplingTensors,
    counter_seed,
    logits_to_probs,
    make_generator,
    sample_from_probs,
)


def probs_for(logits_row: list[float], **params) -> torch.Tensor:  # [V]
    """logits_to_probs on a single row and position."""
    logits = torch.tensor([[logits_row]])  # [1, 1, V]
    return logits_to_probs(logits, SamplingTensors.from_params([SamplingParams(**params)]))[0, 0]


def logits_of(probs_row: list[float]) -> list[float]:
    return [math.log(x) for x in probs_row]


def reference_probs(
    logits_row: torch.Tensor,  # [V]
    params: SamplingParams,
) -> torch.Tensor:  # [V] float32
    """One row, one position, written the slow and obvious way (an oracle for the batched code)."""
    if params.is_greedy:
        return torch.nn.functional.one_hot(logits_row.argmax(), logits_row.numel()).float()
    scaled = logits_row.double() / params.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < params.top_k < scaled.numel():
        keep &= scaled >= scaled.sort(descending=True).values[params.top_k - 1]
    probs = torch.where(keep, scaled, -math.inf).softmax(-1)
    if params.top_p < 1.0:
        nucleus, mass = torch.zeros_like(keep), 0.0
        for token in probs.argsort(descending=True, stable=True).tolist():
            nucleus[token], mass = True, mass + probs[token].item()
            if mass >= params.top_p:
                break
        keep &= nucleus
        probs = torch.where(keep, scaled, -math.inf).softmax(-1)
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs.max()
    return torch.where(keep, scaled, -math.inf).softmax(-1).float()


# ---------------------------------------------------------------- SamplingParams / SamplingTensors


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(temperature=1e-40),  # overflows float32 logits to inf
        dict(top_k=-1),
        dict(top_k=2**31),  # past the worker protocol's int32
        dict(top_k=2**63),
        dict(top_k=2.5),
        dict(top_p=0.0),
        dict(top_p=1e-320),  # 0 in float32: would remove every token
        dict(top_p=1.01),
        dict(top_p=math.nan),
        dict(min_p=-0.01),
        dict(min_p=1.5),
        dict(seed="7"),
        dict(seed=-1),
        dict(seed=2**63),
    ],
)
def test_params_validation_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_params_defaults_are_greedy_and_frozen():
    params = SamplingParams()
    assert params.is_greedy and not SamplingParams(temperature=0.5).is_greedy
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]


def test_sampling_tensors_from_params_dtypes_and_values():
    tensors = SamplingTensors.from_params(
        [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=3)]
    )
    assert tensors.temperature.dtype == torch.float32 and tensors.top_k.dtype == torch.int64
    assert tensors.top_p.dtype == torch.float32 and tensors.min_p.dtype == torch.float32
    assert tensors.is_greedy.tolist() == [True, False]
    assert tensors.top_k.tolist() == [0, 5] and tensors.batch_size == 2
    assert torch.allclose(tensors.temperature, torch.tensor([0.0, 0.7]))


# ---------------------------------------------------------------- logits_to_probs tables

LOGITS = [2.0, 1.0, 0.5, -1.0, 0.0, 1.5]


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_scales_logits(temperature):
    expected = (torch.tensor(LOGITS) / temperature).softmax(-1)
    assert torch.allclose(probs_for(LOGITS, temperature=temperature), expected, atol=1e-7)


@pytest.mark.parametrize(
    "top_k, kept",
    [(1, [0]), (2, [0, 5]), (3, [0, 5, 1]), (6, [0, 1, 2, 3, 4, 5]), (100, [0, 1, 2, 3, 4, 5])],
)
def test_top_k_keeps_the_k_largest(top_k, kept):
    probs = probs_for(LOGITS, temperature=1.0, top_k=top_k)
    expected = torch.zeros(6)
    expected[kept] = torch.tensor(LOGITS)[kept].softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-7)


def test_top_k_keeps_ties_with_the_kth_logit():
    probs = probs_for([1.0, 3.0, 1.0, 0.0], temperature=1.0, top_k=2)
    assert (probs > 0).tolist() == [True, True, True, False]


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.40, [1.0, 0.0, 0.0, 0.0]),  # the top token alone already has 0.5 >= 0.4: exactly one kept
        (1e-6, [1.0, 0.0, 0.0, 0.0]),  # the top token is always kept
        (0.70, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
        (0.90, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (1.00, [0.5, 0.3, 0.15, 0.05]),  # disabled
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, expected):
    probs = probs_for(logits_of([0.5, 0.3, 0.15, 0.05]), temperature=1.0, top_p=top_p)
    assert torch.allclose(probs, torch.tensor(expected), atol=1e-6)


def test_filters_apply_in_order_temperature_top_k_top_p():
    # temperature 0.5 squares the probabilities: [0.25, 0.09, 0.0225, 0.0025] / 0.365.
    # top-k 3 drops the last, so the top token holds 0.25 / 0.3625 = 0.690 >= top_p 0.688: one token.
    # (Top-p before top-k would see 0.25 / 0.365 = 0.685 < 0.688 and keep two; no temperature, 0.5.)
    probs = probs_for(logits_of([0.5, 0.3, 0.15, 0.05]), temperature=0.5, top_k=3, top_p=0.688)
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]
    probs = probs_for(logits_of([0.5, 0.3, 0.15, 0.05]), temperature=0.5, top_p=0.688)
    assert torch.allclose(probs, torch.tensor([0.25 / 0.34, 0.09 / 0.34, 0.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.0, [0.5, 0.3, 0.15, 0.05]),
        (0.2, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # threshold 0.1
        (0.5, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # threshold 0.25
        (1.0, [1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, expected):
    probs = probs_for(logits_of([0.5, 0.3, 0.15, 0.05]), temperature=1.0, min_p=min_p)
    assert torch.allclose(probs, torch.tensor(expected), atol=1e-6)


def test_greedy_rows_are_one_hot_at_the_raw_argmax_lowest_index_on_ties():
    assert probs_for(LOGITS, temperature=0.0, top_k=3).tolist() == [1.0, 0, 0, 0, 0, 0]
    assert probs_for([0.0, 4.0, 1.0, 4.0], temperature=0.0).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_mixed_rows_in_one_batch_match_each_row_alone_and_the_oracle():
    generator = make_generator(0)
    all_params = [
        SamplingParams(),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=0.6, top_k=7, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=2.0, top_k=1),
    ]
    logits = 2.0 * torch.randn(len(all_params), 3, 11, generator=generator)  # [B, T, V]
    batched = logits_to_probs(logits, SamplingTensors.from_params(all_params))
    assert batched.dtype == torch.float32 and batched.shape == logits.shape
    for row, params in enumerate(all_params):
        alone = logits_to_probs(logits[row : row + 1], SamplingTensors.from_params([params]))
        assert torch.equal(batched[row : row + 1], alone)
        for position in range(3):
            oracle = reference_probs(logits[row, position], params)
            assert torch.allclose(batched[row, position], oracle, atol=1e-6), (row, position)
    assert torch.allclose(batched.sum(-1), torch.ones(len(all_params), 3), atol=1e-6)


def test_disabled_filters_leave_the_row_untouched():
    logits = torch.randn(2, 4, 9, generator=make_generator(1))  # [B, T, V]
    params = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.8, top_k=2, top_p=0.5)]
    probs = logits_to_probs(logits, SamplingTensors.from_params(params))
    assert torch.allclose(probs[0], (logits[0] / 0.8).softmax(-1), atol=1e-7)


def test_low_precision_logits_give_float32_probs_and_inputs_are_not_mutated():
    logits = torch.randn(2, 2, 8, generator=make_generator(2))  # [B, T, V]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        typed = logits.to(dtype)
        before = typed.clone()
        sampling = SamplingTensors.from_params([SamplingParams(temperature=0.5, top_k=3), SamplingParams()])
        probs = logits_to_probs(typed, sampling)
        assert probs.dtype == torch.float32
        assert torch.equal(typed, before)


def test_logits_shape_is_checked():
    sampling = SamplingTensors.from_params([SamplingParams()])
    with pytest.raises(ValueError):
        logits_to_probs(torch.zeros(1, 5), sampling)
    with pytest.raises(ValueError):
        logits_to_probs(torch.zeros(2, 1, 5), sampling)


# ---------------------------------------------------------------- sampling and generators


def test_sample_from_probs_is_deterministic_given_seeds_and_respects_zeros():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    first = sample_from_probs(probs, [make_generator(s) for s in (1, 2, 3)])
    again = sample_from_probs(probs, [make_generator(s) for s in (1, 2, 3)])
    assert first.dtype == torch.int64 and first.shape == (3,)
    assert torch.equal(first, again)
    assert first[0].item() in (1, 2) and first[1].item() == 3
    many = sample_from_probs(probs[:1].expand(500, 4), [make_generator(7)] * 500)
    assert set(many.tolist()) == {1, 2}


def test_sample_from_probs_accepts_the_default_rng():
    assert sample_from_probs(torch.tensor([[0.0, 1.0]]), [None]).tolist() == [1]


def test_make_generator_seeded_and_unseeded():
    assert torch.equal(torch.rand(4, generator=make_generator(5)), torch.rand(4, generator=make_generator(5)))
    assert not torch.equal(torch.rand(4, generator=make_generator(None)), torch.rand(4, generator=make_generator(None)))


def test_counter_seeds_are_implied_by_seed_and_counter_and_differ_across_both():
    seeds = {counter_seed(seed, counter) for seed in (0, 1, MAX_SEED) for counter in range(50)}
    assert len(seeds) == 150 and all(0 <= seed <= MAX_SEED for seed in seeds)
    assert counter_seed(7, 3) == counter_seed(7, 3)
