"""Turning logits into the distributions tokens are sampled from, and sampling from them.

`logits_to_probs` applies one request's settings (temperature, then top-k, then top-p, then
min-p) to every position of its row, batched over rows with different settings. The same
function processes draft logits and target logits, so the speculative rule in
`verification.py` compares exactly the distributions the tokens were sampled from.

This module knows nothing about models, caches, requests or speculation. It draws random
numbers only from generators handed to it; it owns no RNG state.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Bounds that keep every step well-defined whatever a request asks: top_k fits the int32 of the
# worker protocol; a positive temperature below MIN_TEMPERATURE would overflow float32 logits to inf,
# a top_p below MIN_TOP_P would round to 0 in float32 and remove every token (NaN probabilities
# either way); seeds are what torch.Generator.manual_seed takes, non-negative.
MAX_TOP_K = 2**31 - 1
MIN_TEMPERATURE = 1e-6
MIN_TOP_P = torch.finfo(torch.float32).tiny
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. A disabled filter leaves the distribution unchanged."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an int in [0, {MAX_TOP_K}] (0 disables), got {self.top_k!r}")
        if not MIN_TOP_P <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [{MIN_TOP_P}, 1] (1 disables), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 disables), got {self.min_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}] or None, got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, eq=False)
class SamplingTensors:
    """A batch's sampling settings as tensors, one entry per row; built once per step."""

    temperature: Tensor  # [B] float32
    top_k: Tensor  # [B] int64
    top_p: Tensor  # [B] float32
    min_p: Tensor  # [B] float32
    is_greedy: Tensor  # [B] bool

    def __post_init__(self) -> None:
        shapes = {t.shape for t in self._fields()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"SamplingTensors fields must all have shape [B], got {shapes}")

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str | None = None
    ) -> SamplingTensors:
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        return cls(
            temperature=temperature,
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            is_greedy=temperature == 0.0,
        )

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def to(self, device: torch.device | str) -> SamplingTensors:
        return SamplingTensors(*(t.to(device) for t in self._fields()))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.is_greedy)


def logits_to_probs(
    logits: Tensor,  # [B, T, V] any float dtype
    sampling: SamplingTensors,  # B rows; row b's settings apply to all T positions of row b
) -> Tensor:  # [B, T, V] float32
    """Processed probabilities: temperature, top-k, top-p, min-p, renormalised.

    Greedy rows are one-hot at the argmax of the raw logits (ties: lowest index, as torch.argmax).
    Top-k keeps every token tied with the k-th largest logit. Top-p keeps the smallest prefix of
    the sorted distribution whose mass reaches top_p (the top token always stays). Min-p keeps the
    tokens whose probability is at least min_p times the largest one. Rows with different settings
    share one batched pass; a filter is a no-op on the rows that disable it.
    """
    if logits.dim() != 3 or logits.shape[0] != sampling.batch_size:
        raise ValueError(f"logits must be [B, T, V], B={sampling.batch_size}, got {tuple(logits.shape)}")
    sampling = sampling.to(logits.device)
    # Greedy rows divide by 1 here; their result is replaced by a one-hot below.
    temperature = sampling.temperature.masked_fill(sampling.is_greedy, 1.0)  # [B]
    scaled = logits.float() / temperature[:, None, None]  # [B, T, V], a new tensor
    probs = _filter_logits(scaled, sampling).softmax(dim=-1)  # [B, T, V]
    greedy_probs = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(sampling.is_greedy[:, None, None], greedy_probs, probs)


def _filter_logits(
    scaled: Tensor,  # [B, T, V] float32, temperature applied
    sampling: SamplingTensors,
) -> Tensor:  # [B, T, V] float32: -inf where top-k, top-p or min-p removes the token
    """Top-k, then top-p, then min-p, in one stable descending order; unused filters cost nothing."""
    vocab_size = scaled.shape[-1]
    top_k_on = (sampling.top_k > 0) & (sampling.top_k < vocab_size)  # [B]
    top_p_on = sampling.top_p < 1.0  # [B]
    min_p_on = sampling.min_p > 0.0  # [B]
    if not bool((top_k_on | top_p_on | min_p_on).any()):
        return scaled
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)  # [B, T, V]
    removed = torch.zeros_like(sorted_logits, dtype=torch.bool)  # [B, T, V], in sorted order

    if bool(top_k_on.any()):
        kth_index = (sampling.top_k.clamp(1, vocab_size) - 1)[:, None, None]  # [B, 1, 1]
        kth_logit = sorted_logits.gather(-1, kth_index.expand(-1, scaled.shape[1], 1))  # [B, T, 1]
        # Tokens tied with the k-th logit stay.
        removed |= top_k_on[:, None, None] & (sorted_logits < kth_logit)
    if bool(top_p_on.any()):
        sorted_probs = sorted_logits.masked_fill(removed, -math.inf).softmax(dim=-1)  # [B, T, V]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, T, V], exclusive cumsum
        # A token is needed while the mass of the tokens before it is still short of top_p.
        removed |= top_p_on[:, None, None] & (mass_before >= sampling.top_p[:, None, None])
    if bool(min_p_on.any()):
        sorted_probs = sorted_logits.masked_fill(removed, -math.inf).softmax(dim=-1)  # [B, T, V]
        # Index 0 holds the largest probability; a ratio to it does not depend on normalisation.
        threshold = sampling.min_p[:, None, None] * sorted_probs[..., :1]  # [B, T, 1]
        removed |= min_p_on[:, None, None] & (sorted_probs < threshold)
    removed_by_token = torch.empty_like(removed).scatter_(-1, sorted_ids, removed)  # [B, T, V]
    return scaled.masked_fill(removed_by_token, -math.inf)


def sample_from_probs(
    probs: Tensor,  # [B, V] float32
    generators: Sequence[torch.Generator | None],  # one per row; None = torch's default RNG
) -> Tensor:  # [B] int64
    """One token per row, row b drawn with generators[b]; deterministic given generator states.

    Draws happen on the generator's device, so a CPU generator gives the same token whatever
    device the probabilities live on.
    """
    if probs.dim() != 2 or len(generators) != probs.shape[0]:
        raise ValueError(
            f"need probs [B, V] and B generators, got {tuple(probs.shape)}, {len(generators)}"
        )
    token_ids = []
    for row_probs, generator in zip(probs, generators):
        row_probs = row_probs if generator is None else row_probs.to(generator.device)
        token_ids.append(torch.multinomial(row_probs, 1, generator=generator))
    if not token_ids:
        return torch.empty(0, dtype=torch.int64, device=probs.device)
    return torch.cat([t.to(probs.device) for t in token_ids])


def make_generator(seed: int | None) -> torch.Generator:
    """A seeded CPU generator; seed None seeds it from os.urandom (fresh on every call)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(random_seed() if seed is None else seed)
    return generator


def random_seed() -> int:
    """A fresh seed from os.urandom, within what `SamplingParams.seed` accepts."""
    return int.from_bytes(os.urandom(8), "little") & MAX_SEED


def counter_seed(seed: int, counter: int) -> int:
    """The seed of draw stream number `counter` of `seed`: a hash of both (counter-based RNG, as
    Philox or JAX's fold_in), so streams of different counters are unrelated and a stream is
    implied by (seed, counter) alone: no generator state needs saving or sending."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little") + counter.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED
