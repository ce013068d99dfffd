"""Calibrated prefix survival probabilities: sequential temperature scaling (DSpark, section on
confidence-scheduled verification).

A drafter's confidence head emits, per drafted position k, a logit of
c_k = P(target accepts draft k | drafts 1..k-1 accepted). The survival probability of the prefix
of length j is S_j = prod_{k<=j} sigmoid(confidence_logit_k / T_k). The temperatures are fitted
left to right on held-out verification records: T_1 first, then T_2 with T_1 fixed, ... each
minimising the expected calibration error (ECE, equal-width bins) of S_j against "the prefix of
length j was fully accepted", by a grid search over log T (a finer grid around the best point);
grid points whose ECE is within `ECE_TIE_TOLERANCE` of the best count as ties, broken by the
binary negative log-likelihood.

Calibration must not make things worse: given records held out of the fit, each T_j is kept only
where it lowers their ECE of S_j (else T_j = 1, the identity), and if the pooled held-out ECE does
not improve, every temperature is 1. The held-out ECE reported is on the records that made these
keep-or-drop choices (one bit per position), not on records the whole procedure never saw.

This module knows nothing about drafters, models or files on disk: it takes tensors of
confidence logits, draft lengths and accepted counts, and returns plain dataclasses (with
`to_dict`/`from_dict` for whoever stores them as JSON).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

NUM_BINS = 15
ECE_TIE_TOLERANCE = 1e-3  # ECE differences below this are noise at any realistic data size
MIN_PAIRS_PER_POSITION = 20  # fewer records than this at a position: its temperature is carried over
LOG_TEMPERATURE_RANGE = (-5.0, 5.0)  # T in [0.0067, 148]
COARSE_GRID_SIZE = 101
FINE_GRID_SIZE = 21


@dataclass(frozen=True, eq=False)
class AcceptanceRecords:
    """Verification steps of one drafter: what its confidence head said and what the target kept."""

    confidence_logits: Tensor  # [N, K] float32, padded past num_draft_tokens
    num_draft_tokens: Tensor  # [N] int64
    num_accepted: Tensor  # [N] int64, <= num_draft_tokens

    @property
    def num_steps(self) -> int:
        return int(self.num_draft_tokens.shape[0])

    @property
    def max_draft_tokens(self) -> int:
        return int(self.confidence_logits.shape[1])

    def labels(self) -> tuple[Tensor, Tensor]:
        """prefix_accepted [N, K] float32 (1 where num_accepted >= j) and drafted [N, K] bool."""
        positions = torch.arange(1, self.max_draft_tokens + 1)  # [K]
        drafted = positions[None, :] <= self.num_draft_tokens[:, None]  # [N, K]
        prefix_accepted = (self.num_accepted[:, None] >= positions[None, :]).float()  # [N, K]
        return prefix_accepted, drafted

    def subset(self, rows: Tensor) -> "AcceptanceRecords":
        return AcceptanceRecords(self.confidence_logits[rows], self.num_draft_tokens[rows], self.num_accepted[rows])

    @classmethod
    def from_steps(cls, logits: Sequence[Sequence[float]], num_accepted: Sequence[int]) -> "AcceptanceRecords":
        """One entry per step: the confidence logits of its drafted positions, the accepted count."""
        width = max((len(row) for row in logits), default=0)
        padded = torch.zeros(len(logits), width)
        for row, values in enumerate(logits):
            padded[row, : len(values)] = torch.tensor(list(values), dtype=torch.float32)
        num_draft_tokens = torch.tensor([len(row) for row in logits], dtype=torch.long)
        accepted = torch.tensor(list(num_accepted), dtype=torch.long)
        if bool((accepted > num_draft_tokens).any()) or bool((accepted < 0).any()):
            raise ValueError("num_accepted must lie in [0, num_draft_tokens] for every step")
        return cls(padded, num_draft_tokens, accepted)


def survival_probs(
    confidence_logits: Tensor,  # [..., K] float
    temperatures: Sequence[float] | Tensor | None = None,  # [K'] > 0; positions past K' reuse the last
) -> Tensor:  # [..., K] float32, nonincreasing along the last dimension
    """S_j = prod_{k<=j} sigmoid(confidence_logit_k / T_k)."""
    logits = confidence_logits.float()
    if temperatures is not None and len(temperatures) and logits.shape[-1]:
        logits = logits / _expand_temperatures(temperatures, logits.shape[-1])
    return torch.sigmoid(logits).cumprod(-1)


def _expand_temperatures(temperatures: Sequence[float] | Tensor, width: int) -> Tensor:  # [width]
    values = torch.as_tensor(temperatures, dtype=torch.float32).flatten()
    if bool((values <= 0).any()):
        raise ValueError("temperatures must be > 0")
    if values.numel() >= width:
        return values[:width]
    return torch.cat([values, values[-1].repeat(width - values.numel())])


@dataclass(frozen=True)
class ReliabilityTable:
    """Equal-width bins of predicted probability: how often the predicted event happened."""

    bin_lower: list[float]
    bin_upper: list[float]
    count: list[int]
    mean_confidence: list[float]  # mean predicted probability in the bin (nan when empty)
    accuracy: list[float]  # observed frequency in the bin (nan when empty)

    @property
    def ece(self) -> float:
        total = sum(self.count)
        if total == 0:
            return 0.0
        return sum(n / total * abs(conf - acc) for n, conf, acc in zip(self.count, self.mean_confidence, self.accuracy)
                   if n > 0)


def reliability_table(
    probs: Tensor,  # [M] predicted probabilities in [0, 1]
    labels: Tensor,  # [M] 0/1 outcomes
    num_bins: int = NUM_BINS,
) -> ReliabilityTable:
    count, confidence_sum, label_sum = _bin_sums(probs.double(), labels.double(), num_bins)
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    safe = count.clamp(min=1)
    empty = count == 0
    mean_confidence = torch.where(empty, math.nan, confidence_sum / safe)
    accuracy = torch.where(empty, math.nan, label_sum / safe)
    return ReliabilityTable(edges[:-1].tolist(), edges[1:].tolist(), count.long().tolist(),
                            mean_confidence.tolist(), accuracy.tolist())


def expected_calibration_error(
    probs: Tensor,  # [..., M] predicted probabilities in [0, 1]; leading dims are independent problems
    labels: Tensor,  # [M] 0/1 outcomes
    num_bins: int = NUM_BINS,
) -> Tensor:  # [...] float64: sum over bins of (bin share) * |mean probability - observed frequency|
    count, confidence_sum, label_sum = _bin_sums(probs.double(), labels.double(), num_bins)
    return (confidence_sum - label_sum).abs().sum(-1) / max(1, labels.shape[-1])


def _bin_sums(probs: Tensor, labels: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per bin: count, sum of probabilities, sum of labels. # each [..., num_bins] float64"""
    bins = (probs * num_bins).floor().long().clamp(0, num_bins - 1)  # [..., M]; p == 1 goes to the top bin
    shape = (*probs.shape[:-1], num_bins)
    count = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, bins, torch.ones_like(probs))
    confidence_sum = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, bins, probs)
    label_sum = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, bins, labels.expand_as(probs))
    return count, confidence_sum, label_sum


def binary_nll(probs: Tensor, labels: Tensor) -> Tensor:  # probs [..., M], labels [M] -> [...] float64
    probs = probs.double().clamp(1e-12, 1 - 1e-12)
    labels = labels.double()
    return -(labels * probs.log() + (1 - labels) * (1 - probs).log()).mean(-1)


@dataclass(frozen=True)
class CalibrationReport:
    """ECE of survival probabilities on one set of records, before and after temperature scaling.
    The pooled ECE bins every (step, drafted position) pair together."""

    num_steps: int
    num_pairs: int  # (step, drafted position) pairs
    ece_before: float
    ece_after: float
    ece_before_per_position: list[float]
    ece_after_per_position: list[float]


@dataclass(frozen=True)
class Calibration:
    """Fitted per-position temperatures and how well they calibrate; stored as calibration.json."""

    temperatures: list[float]  # T_1..T_K
    num_bins: int
    fit: CalibrationReport  # on the records the temperatures were fitted on
    heldout: CalibrationReport | None = None  # on records kept out of the fit, if any
    identity_positions: list[int] = field(default_factory=list)  # 1-based positions left at T = 1

    @property
    def ece_after(self) -> float:
        """The headline figure: held-out ECE after scaling when there is a held-out set."""
        return (self.heldout or self.fit).ece_after

    def to_dict(self) -> dict:
        return {"format": "dspark-ray/calibration/v1", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        if data.get("format") != "dspark-ray/calibration/v1":
            raise ValueError(f"not a dspark-ray calibration (format {data.get('format')!r})")
        heldout = data.get("heldout")
        return cls(list(map(float, data["temperatures"])), int(data["num_bins"]), CalibrationReport(**data["fit"]),
                   CalibrationReport(**heldout) if heldout else None, list(data.get("identity_positions", [])))

    def at_grid_edge(self) -> list[int]:
        """1-based positions whose temperature sits on the edge of the search grid."""
        return [k + 1 for k, t in enumerate(self.temperatures)
                if min(abs(math.log(t) - edge) for edge in LOG_TEMPERATURE_RANGE) < 1e-9]


def fit_sequential_temperatures(records: AcceptanceRecords, num_bins: int = NUM_BINS,
                                heldout: AcceptanceRecords | None = None) -> list[float]:
    """T_1..T_K fitted left to right: T_j minimises the ECE of S_j given T_1..T_{j-1}; with `heldout`
    records, T_j is kept only where it lowers their ECE of S_j, else it is 1."""
    prefix_accepted, drafted = records.labels()
    logits = records.confidence_logits.double()
    temperatures: list[float] = []
    survival_before = torch.ones(records.num_steps, dtype=torch.float64)  # S_{j-1} with fitted temperatures
    for position in range(records.max_draft_tokens):
        rows = drafted[:, position]
        previous = temperatures[-1] if temperatures else 1.0
        if int(rows.sum()) < MIN_PAIRS_PER_POSITION:
            temperatures.append(previous)
        else:
            temperatures.append(_fit_one(logits[rows, position], survival_before[rows],
                                         prefix_accepted[rows, position], num_bins))
        if heldout is not None:
            temperatures[-1] = _kept_on_heldout(heldout, temperatures, num_bins)
        survival_before = survival_before * torch.sigmoid(logits[:, position] / temperatures[-1])
    return temperatures


def _kept_on_heldout(heldout: AcceptanceRecords, temperatures: list[float], num_bins: int) -> float:
    """The last temperature if it lowers the held-out ECE of S_j (j = its position) against T_j = 1,
    else 1; also 1 where too few held-out records reach position j to tell."""
    position = len(temperatures) - 1
    if position >= heldout.max_draft_tokens:
        return 1.0
    prefix_accepted, drafted = heldout.labels()
    rows = drafted[:, position]
    if int(rows.sum()) < MIN_PAIRS_PER_POSITION:
        return 1.0
    logits = heldout.confidence_logits[rows, : position + 1]
    probs = torch.stack([survival_probs(logits, temperatures[:-1] + [t])[:, position] for t in (temperatures[-1], 1.0)])
    ece = expected_calibration_error(probs, prefix_accepted[rows, position], num_bins)  # [2]
    return temperatures[-1] if float(ece[0]) < float(ece[1]) else 1.0


def _fit_one(logits: Tensor, survival_before: Tensor, labels: Tensor, num_bins: int) -> float:
    """The temperature minimising ECE of survival_before * sigmoid(logits / T); ties by NLL."""
    low, high = LOG_TEMPERATURE_RANGE
    coarse = torch.linspace(low, high, COARSE_GRID_SIZE, dtype=torch.float64)
    best = _best_log_temperature(coarse, logits, survival_before, labels, num_bins)
    step = (high - low) / (COARSE_GRID_SIZE - 1)
    fine = torch.linspace(best - step, best + step, FINE_GRID_SIZE, dtype=torch.float64).clamp(low, high)
    return math.exp(_best_log_temperature(torch.cat([fine, torch.tensor([best], dtype=torch.float64)]),
                                          logits, survival_before, labels, num_bins))


def _best_log_temperature(log_temperatures: Tensor, logits: Tensor, survival_before: Tensor, labels: Tensor,
                          num_bins: int) -> float:
    probs = survival_before[None, :] * torch.sigmoid(logits[None, :] / log_temperatures.exp()[:, None])  # [G, M]
    ece = expected_calibration_error(probs, labels, num_bins)  # [G]
    tied = (ece <= ece.min() + ECE_TIE_TOLERANCE).nonzero()[:, 0]  # [G'] grid points as good as the best
    return float(log_temperatures[tied[binary_nll(probs[tied], labels).argmin()]])


def calibration_report(records: AcceptanceRecords, temperatures: Sequence[float],
                       num_bins: int = NUM_BINS) -> CalibrationReport:
    prefix_accepted, drafted = records.labels()
    before = survival_probs(records.confidence_logits)
    after = survival_probs(records.confidence_logits, temperatures) if records.max_draft_tokens else before
    per_position_before, per_position_after = [], []
    for position in range(records.max_draft_tokens):
        rows = drafted[:, position]
        labels = prefix_accepted[rows, position]
        per_position_before.append(float(expected_calibration_error(before[rows, position], labels, num_bins)))
        per_position_after.append(float(expected_calibration_error(after[rows, position], labels, num_bins)))
    labels = prefix_accepted[drafted]
    return CalibrationReport(
        num_steps=records.num_steps, num_pairs=int(drafted.sum()),
        ece_before=float(expected_calibration_error(before[drafted], labels, num_bins)),
        ece_after=float(expected_calibration_error(after[drafted], labels, num_bins)),
        ece_before_per_position=per_position_before, ece_after_per_position=per_position_after,
    )


def calibrate(fit_records: AcceptanceRecords, heldout_records: AcceptanceRecords | None = None,
              num_bins: int = NUM_BINS) -> Calibration:
    """Fit on `fit_records`; with `heldout_records`, keep only the temperatures that lower their ECE
    (see the module docstring) and report on both."""
    if fit_records.num_steps == 0 or not bool((fit_records.num_draft_tokens > 0).any()):
        raise ValueError("no drafted positions to calibrate on")
    if heldout_records is not None and not heldout_records.num_steps:
        heldout_records = None
    temperatures = fit_sequential_temperatures(fit_records, num_bins, heldout_records)
    heldout = None
    if heldout_records is not None:
        heldout = calibration_report(heldout_records, temperatures, num_bins)
        if heldout.ece_after >= heldout.ece_before:  # no better as a whole: no scaling at all
            temperatures = [1.0] * len(temperatures)
            heldout = calibration_report(heldout_records, temperatures, num_bins)
    identity = [k + 1 for k, t in enumerate(temperatures) if t == 1.0]
    return Calibration(temperatures, num_bins, calibration_report(fit_records, temperatures, num_bins), heldout,
                       identity)
