"""How many drafted tokens each request sends to the target: DSpark's hardware-aware prefix
scheduler (Algorithm 1 of the DSpark paper), a fixed-length baseline, and the throughput curve
SPS(B) both are judged by.

Every request always verifies one position of its own (the last committed token, whose logits
give the recovered or bonus token), so a step that verifies n_b drafts of request b holds
B = sum_b (1 + n_b) tokens and emits tau = sum_b (1 + S_b1 + ... + S_bn_b) tokens in expectation,
S_bj being the survival probability of request b's draft prefix of length j. The scheduler
maximises the throughput Theta = tau * SPS(B).

Greedy with early stopping: candidates (b, j) are admitted in descending S_bj (ties: lower
position first, then lower row), and admission stops at the first candidate that does not
increase Theta. Since S_bj is nonincreasing in j, this order admits a prefix of every row. Why
stop early rather than take the argmax over the whole greedy path:
  1. It is exact when the step time 1/SPS(B) is convex and nondecreasing in B (flat while the
     hardware is memory-bound, then linear: the usual shape). The top-n candidates maximise tau
     for every n, and the increment condition S_next * t(B) > (tau) * (t(B+1) - t(B)) is then
     monotone in n, so Theta rises then falls. Only a non-convex curve (steps from tile sizes)
     can hide a second, higher peak; the argmax would find it.
  2. It keeps sampling lossless. The confidence of draft k may depend on the drafted token
     x_{k-1} (DSpark: c_k = sigmoid(w . [h_k ; embed(x_{k-1})])). With early stopping, whether
     (b, j) is verified depends only on candidates ordered before it: other rows and row b's
     positions < j, none of which depends on x_bj. The argmax looks at S_b,j+1, which depends on
     x_bj, so whether x_bj is verified would depend on x_bj itself and bias the output.

Padded batches. An engine that pads every row of the verification forward to the longest one
pays for B = num_requests * (1 + longest verified draft), not the sum. For such an engine
(`padded=True`; ours, whose runner pads) the step cost depends only on that common width L, and
at a given width verifying every draft up to it is free, so the scheduler picks one cap L for the
batch: rows verify min(num_draft_tokens, L), L grows from 0 while Theta grows. Both arguments
above carry over (exact for convex step time; whether draft j of a row is verified depends only on
survival at positions <= j).

This module knows nothing about drafters, models or the engine: tensors and floats in and out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class SpsCurve:
    """Target verification steps per second vs the number of tokens B in the batch.

    Held as step times t(B) = 1 / SPS(B), made nondecreasing in B (pool-adjacent-violators on
    the measurements: a bigger batch never verifies faster; noise would otherwise reward
    admitting tokens) and interpolated linearly; below the first point t is constant, above
    the last it grows along the last segment's slope.
    """

    num_tokens: Tensor  # [P] float64, strictly increasing
    step_time_s: Tensor  # [P] float64, > 0 and nondecreasing

    @classmethod
    def from_measurements(cls, num_tokens: Sequence[float], steps_per_second: Sequence[float]) -> "SpsCurve":
        if len(num_tokens) != len(steps_per_second) or not num_tokens:
            raise ValueError("an SPS curve needs as many (>= 1) throughputs as token counts")
        tokens = torch.tensor(list(num_tokens), dtype=torch.float64)
        sps = torch.tensor(list(steps_per_second), dtype=torch.float64)
        if bool((tokens <= 0).any()) or not bool(torch.isfinite(sps).all()) or bool((sps <= 0).any()):
            raise ValueError("token counts and steps per second must be positive and finite")
        unique, inverse = torch.unique(tokens, sorted=True, return_inverse=True)
        counts = torch.zeros_like(unique).index_add_(0, inverse, torch.ones_like(tokens))
        times = torch.zeros_like(unique).index_add_(0, inverse, 1.0 / sps) / counts  # mean time per B
        return cls(unique, _nondecreasing(times, counts))

    @classmethod
    def linear(cls, base_step_time_s: float, time_per_token_s: float, max_tokens: int = 256) -> "SpsCurve":
        """t(B) = base + per_token * B at B = 1, 2, 4, ... (synthetic curves for tests and what-ifs)."""
        points = [2 ** i for i in range(max_tokens.bit_length()) if 2 ** i <= max_tokens]
        return cls.from_measurements(points, [1.0 / (base_step_time_s + time_per_token_s * b) for b in points])

    def step_time(self, num_tokens: Tensor | float) -> Tensor:  # [...] float64 seconds per step
        tokens = torch.as_tensor(num_tokens, dtype=torch.float64)
        if self.num_tokens.numel() == 1:
            return self.step_time_s[0].expand_as(tokens).clone()
        slopes = (self.step_time_s[1:] - self.step_time_s[:-1]) / (self.num_tokens[1:] - self.num_tokens[:-1])
        segment = (torch.searchsorted(self.num_tokens, tokens, right=True) - 1).clamp(0, slopes.numel() - 1)
        offset = tokens.clamp(min=float(self.num_tokens[0])) - self.num_tokens[segment]
        return self.step_time_s[segment] + slopes[segment] * offset

    def steps_per_second(self, num_tokens: Tensor | float) -> Tensor:  # [...] float64
        return 1.0 / self.step_time(num_tokens)

    def to_dict(self) -> dict:
        return {"num_tokens": self.num_tokens.tolist(), "steps_per_second": (1.0 / self.step_time_s).tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "SpsCurve":
        return cls.from_measurements(data["num_tokens"], data["steps_per_second"])


def _nondecreasing(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted isotonic regression (pool adjacent violators): the closest nondecreasing fit."""
    blocks: list[list[float]] = []  # [value, weight, length]
    for value, weight in zip(values.tolist(), weights.tolist()):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            value_b, weight_b, length_b = blocks.pop()
            value_a, weight_a, length_a = blocks.pop()
            total = weight_a + weight_b
            blocks.append([(value_a * weight_a + value_b * weight_b) / total, total, length_a + length_b])
    return torch.tensor([value for value, _, length in blocks for _ in range(length)], dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class VerificationSchedule:
    num_verify_tokens: Tensor  # [B] int64: drafted tokens each request sends to the target
    expected_tokens: float  # tau: expected tokens the step emits (accepted + one recovered/bonus per request)
    num_batch_tokens: int  # B = sum(1 + num_verify_tokens)
    throughput: float  # Theta = tau * SPS(B), expected tokens per second


def monotone_survival(
    survival: Tensor,  # [B, K] survival probabilities
    num_draft_tokens: Tensor,  # [B] int64: valid entries per row
) -> Tensor:  # [B, K] float64 in [0, 1], nonincreasing along each row, 0 past num_draft_tokens
    """Clamped to [0, 1] and made nonincreasing (a running minimum: survival of a longer prefix
    can't exceed a shorter one's; exact products already are)."""
    valid = torch.arange(survival.shape[1])[None, :] < num_draft_tokens[:, None]  # [B, K]
    clean = torch.nan_to_num(survival.double(), nan=0.0).clamp(0.0, 1.0)
    if clean.shape[1]:
        clean = clean.cummin(dim=1).values
    return torch.where(valid, clean, torch.zeros_like(clean))


def schedule_throughput(survival: Tensor, num_verify_tokens: Tensor, curve: SpsCurve,
                        padded: bool = False) -> VerificationSchedule:
    """Evaluate any schedule: survival [B, K] (monotone), num_verify_tokens [B] int64."""
    admitted = torch.arange(survival.shape[1])[None, :] < num_verify_tokens[:, None]  # [B, K]
    batch = survival.shape[0]
    expected = batch + float(survival.double()[admitted].sum())
    if padded:
        num_batch_tokens = batch * (1 + int(num_verify_tokens.max())) if batch else 0
    else:
        num_batch_tokens = batch + int(num_verify_tokens.sum())
    throughput = expected * float(curve.steps_per_second(num_batch_tokens)) if batch else 0.0
    return VerificationSchedule(num_verify_tokens.long(), expected, num_batch_tokens, throughput)


def schedule_by_confidence(
    survival: Tensor,  # [B, K] survival probabilities of each request's draft prefixes
    num_draft_tokens: Tensor,  # [B] int64: drafted tokens per request (ragged rows)
    curve: SpsCurve,
    padded: bool = False,  # the verification forward pads rows to the longest (see the module docstring)
) -> VerificationSchedule:
    """DSpark's prefix scheduler: greedy admission in descending survival with early stopping."""
    batch = survival.shape[0]
    survival = monotone_survival(survival, num_draft_tokens)
    if padded:
        return _schedule_padded(survival, num_draft_tokens, curve)
    valid = torch.arange(survival.shape[1])[None, :] < num_draft_tokens[:, None]  # [B, K]
    rows, positions = valid.nonzero(as_tuple=True)  # [N] each, row-major
    probs = survival[rows, positions]  # [N]
    order = torch.sort(positions, stable=True).indices  # ties: lower position first, then lower row
    order = order[torch.sort(-probs[order], stable=True).indices]
    expected = batch + torch.cat([probs.new_zeros(1), probs[order].cumsum(0)])  # [N+1] tau after n admissions
    throughput = expected * curve.steps_per_second(batch + torch.arange(order.numel() + 1))  # [N+1]
    grows = throughput[1:] > throughput[:-1]  # [N]
    num_admitted = int(grows.long().cumprod(0).sum())  # up to the first candidate that doesn't help
    counts = torch.bincount(rows[order[:num_admitted]], minlength=batch)  # [B]
    return schedule_throughput(survival, counts, curve)


def _schedule_padded(survival: Tensor, num_draft_tokens: Tensor, curve: SpsCurve) -> VerificationSchedule:
    """One cap L for the batch, grown from 0 while Theta grows. # survival [B, K] monotone"""
    batch = survival.shape[0]
    width = int(num_draft_tokens.max()) if batch else 0
    expected = batch + torch.cat([survival.new_zeros(1), survival.sum(0)[:width].cumsum(0)])  # [width+1] tau(L)
    throughput = expected * curve.steps_per_second(batch * (1 + torch.arange(width + 1)))  # [width+1]
    cap = int((throughput[1:] > throughput[:-1]).long().cumprod(0).sum())
    return schedule_throughput(survival, num_draft_tokens.long().clamp(max=cap), curve, padded=True)


def schedule_fixed(survival: Tensor, num_draft_tokens: Tensor, curve: SpsCurve,
                   length: int | None = None, padded: bool = False) -> VerificationSchedule:
    """Every request verifies min(num_draft_tokens, length) drafts (all of them when length is None)."""
    counts = num_draft_tokens.long() if length is None else num_draft_tokens.long().clamp(max=length)
    return schedule_throughput(monotone_survival(survival, num_draft_tokens), counts, curve, padded)
