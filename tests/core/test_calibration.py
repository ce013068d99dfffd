"""Sequential temperature scaling of survival probabilities (dspark_ray.core.calibration): ECE and
reliability tables on hand-made cases, and recovery of known temperatures on synthetic records."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark_ray.core.calibration import (
    AcceptanceRecords,
    Calibration,
    calibrate,
    calibration_report,
    expected_calibration_error,
    fit_sequential_temperatures,
    reliability_table,
    survival_probs,
)


def synthetic_records(num_steps: int, true_temperatures: list[float], seed: int) -> AcceptanceRecords:
    """A confidence head whose logits are the true conditional acceptance logits times T_k: fitting
    must find T_k. Acceptance is simulated left to right: position k is accepted with probability
    c_k once 1..k-1 were."""
    generator = torch.Generator().manual_seed(seed)
    num_positions = len(true_temperatures)
    true_logits = torch.randn(num_steps, num_positions, generator=generator) * 1.5 + 0.5  # [N, K]
    accepted_each = torch.rand(num_steps, num_positions, generator=generator) < torch.sigmoid(true_logits)
    num_accepted = accepted_each.long().cumprod(1).sum(1)  # [N]: first rejection ends the prefix
    num_draft_tokens = torch.randint(1, num_positions + 1, (num_steps,), generator=generator)  # ragged
    num_accepted = torch.minimum(num_accepted, num_draft_tokens)
    emitted = true_logits * torch.tensor(true_temperatures)
    return AcceptanceRecords(emitted, num_draft_tokens, num_accepted)


def test_survival_is_the_running_product_of_scaled_sigmoids():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    expected = torch.sigmoid(torch.tensor([1.0, -0.25, 0.125])).cumprod(0)
    torch.testing.assert_close(survival_probs(logits, [2.0, 4.0])[0], expected)  # T_3 reuses T_2
    torch.testing.assert_close(survival_probs(logits)[0], torch.sigmoid(logits[0]).cumprod(0))
    with pytest.raises(ValueError):
        survival_probs(logits, [1.0, 0.0, 1.0])


@pytest.mark.parametrize("probs, labels, ece", [
    ([0.9] * 10, [1] * 9 + [0], 0.0),  # 90% predicted, 90% happened
    ([1.0] * 4, [1, 0, 1, 0], 0.5),
    ([0.05, 0.95], [0, 1], 0.05),  # two bins, each off by 0.05
    ([0.2, 0.2, 0.8, 0.8], [0, 1, 1, 1], (2 * 0.3 + 2 * 0.2) / 4),
])
def test_ece_table(probs, labels, ece):
    probs, labels = torch.tensor(probs), torch.tensor(labels, dtype=torch.float32)
    assert float(expected_calibration_error(probs, labels)) == pytest.approx(ece, abs=1e-6)
    assert reliability_table(probs, labels).ece == pytest.approx(ece, abs=1e-6)


def test_reliability_table_bins():
    table = reliability_table(torch.tensor([0.0, 0.1, 0.55, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0]), num_bins=2)
    assert table.bin_lower == [0.0, 0.5] and table.bin_upper == [0.5, 1.0]
    assert table.count == [2, 2]
    assert table.mean_confidence == pytest.approx([0.05, 0.775])
    assert table.accuracy == pytest.approx([0.5, 1.0])
    empty = reliability_table(torch.tensor([0.9]), torch.tensor([1.0]), num_bins=4)
    assert empty.count == [0, 0, 0, 1] and math.isnan(empty.accuracy[0])


def test_ece_is_batched_over_leading_dimensions():
    labels = torch.tensor([1.0, 0.0, 1.0])
    probs = torch.tensor([[0.9, 0.1, 0.9], [0.5, 0.5, 0.5]])
    ece = expected_calibration_error(probs, labels)
    assert ece.shape == (2,)
    assert float(ece[1]) == pytest.approx(float(expected_calibration_error(probs[1], labels)))


def test_sequential_fit_recovers_known_temperatures_and_calibrates_heldout_data():
    true_temperatures = [2.0, 0.5, 3.0, 1.0]
    fit_records = synthetic_records(6000, true_temperatures, seed=0)
    heldout_records = synthetic_records(3000, true_temperatures, seed=1)
    calibration = calibrate(fit_records, heldout_records)
    for fitted, true in zip(calibration.temperatures, true_temperatures):
        assert fitted == pytest.approx(true, rel=0.3)
    assert calibration.heldout.ece_before > 0.05
    assert calibration.heldout.ece_after <= 0.03
    assert calibration.ece_after == calibration.heldout.ece_after
    assert all(after < before for before, after in zip(calibration.heldout.ece_before_per_position,
                                                       calibration.heldout.ece_after_per_position))
    assert calibration.fit.num_steps == 6000
    assert calibration.fit.num_pairs == int(fit_records.num_draft_tokens.sum())


def test_later_temperatures_are_fitted_given_the_earlier_ones():
    records = synthetic_records(4000, [2.0, 2.0], seed=2)
    temperatures = fit_sequential_temperatures(records)
    # Refitting position 2 with a wrong T_1 gives a different T_2: position 2 sees S_1 * c_2.
    wrong_first = AcceptanceRecords(records.confidence_logits * torch.tensor([4.0, 1.0]),
                                    records.num_draft_tokens, records.num_accepted)
    assert fit_sequential_temperatures(wrong_first)[0] == pytest.approx(4 * temperatures[0], rel=0.05)
    assert fit_sequential_temperatures(wrong_first)[1] == pytest.approx(temperatures[1], rel=0.05)


def test_perfectly_calibrated_head_stays_calibrated():
    calibration = calibrate(synthetic_records(6000, [1.0, 1.0, 1.0], seed=3),
                            synthetic_records(3000, [1.0, 1.0, 1.0], seed=4))
    assert calibration.temperatures[:2] == pytest.approx([1.0, 1.0], rel=0.15)
    assert calibration.heldout.ece_after <= calibration.heldout.ece_before + 0.01


def test_sparse_positions_carry_the_previous_temperature():
    logits = [[3.0, 1.0]] * 5 + [[3.0]] * 200
    accepted = [1] * 5 + [1] * 150 + [0] * 50
    records = AcceptanceRecords.from_steps(logits, accepted)
    temperatures = fit_sequential_temperatures(records)
    assert temperatures[1] == temperatures[0]


def test_records_validate_and_calibration_round_trips_through_json():
    with pytest.raises(ValueError):
        AcceptanceRecords.from_steps([[1.0]], [2])
    with pytest.raises(ValueError):
        calibrate(AcceptanceRecords.from_steps([[]], [0]))
    records = synthetic_records(500, [1.5, 1.5], seed=4)
    calibration = calibrate(records)
    data = json.loads(json.dumps(calibration.to_dict()))
    assert Calibration.from_dict(data) == calibration
    assert calibration.heldout is None and calibration.ece_after == calibration.fit.ece_after
    report = calibration_report(records, calibration.temperatures)
    assert report == calibration.fit


def test_temperatures_that_do_not_lower_heldout_ece_stay_at_one():
    fit = synthetic_records(6000, [3.0, 3.0], seed=5)  # the fit split says: 3x too confident ...
    heldout = synthetic_records(3000, [1.0, 1.0], seed=6)  # ... the held-out split is calibrated already
    calibration = calibrate(fit, heldout)
    assert calibration.temperatures[0] == 1.0 and 1 in calibration.identity_positions  # T_1 ~ 3 would hurt
    assert calibration.heldout.ece_after <= calibration.heldout.ece_before
    assert all(after <= before for before, after in zip(calibration.heldout.ece_before_per_position,
                                                        calibration.heldout.ece_after_per_position))


def test_the_grid_reaches_below_the_old_floor_of_0_05():
    calibration = calibrate(synthetic_records(6000, [0.02], seed=7), synthetic_records(3000, [0.02], seed=8))
    assert calibration.temperatures[0] == pytest.approx(0.02, rel=0.3)
    assert calibration.at_grid_edge() == [] and calibration.identity_positions == []
