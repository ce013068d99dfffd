"""The grid codec: draft distributions small on the wire and bit-exact on both sides."""

from __future__ import annotations

import pytest
import torch

from dspark_ray.serving.distributed import codec, convert

VOCAB = 1000


def _distributions(seed: int, shape=(4, 3), sharpness: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, VOCAB, generator=generator) * sharpness, dim=-1)


@pytest.mark.parametrize("max_support", [1, 7, 64, VOCAB])
def test_quantize_sums_to_one_exactly_on_a_bounded_support(max_support: int) -> None:
    quantized = codec.quantize(_distributions(0), max_support)
    assert quantized.dtype == torch.float32
    assert torch.equal(quantized.sum(-1), torch.ones(4, 3))  # dyadic values: the float32 sum is exact
    assert int((quantized > 0).sum(-1).max()) <= max_support
    assert torch.equal(quantized * codec.GRID, (quantized * codec.GRID).round())


def test_quantize_keeps_the_top_tokens_and_stays_close() -> None:
    probs = _distributions(1)
    quantized = codec.quantize(probs, 64)
    assert torch.equal(quantized.argmax(-1), probs.argmax(-1))
    # L1 distance: twice the mass outside the kept tokens, plus at most one grid unit per kept token.
    dropped = 1 - probs.topk(64, dim=-1).values.sum(-1)
    assert bool(((quantized - probs).abs().sum(-1) <= 2 * dropped + 64 / codec.GRID + 1e-6).all())


def test_encode_decode_is_exact_and_idempotent() -> None:
    quantized = codec.quantize(_distributions(2), 64).reshape(-1, VOCAB)
    for row in quantized:
        sparse = codec.encode(row)
        assert sparse.counts is not None and sparse.probs is None
        assert torch.equal(codec.decode(sparse, VOCAB), row)
        assert torch.equal(codec.encode(codec.decode(sparse, VOCAB)).counts, sparse.counts)


def test_a_distribution_off_the_grid_travels_as_exact_float32() -> None:
    probs = _distributions(3)[0, 0]
    sparse = codec.encode(probs)
    assert sparse.counts is None
    assert torch.equal(codec.decode(sparse, VOCAB), probs)


def test_one_hot_is_one_count_of_grid() -> None:
    one_hot = torch.nn.functional.one_hot(torch.tensor(17), VOCAB).float()
    assert torch.equal(codec.quantize(one_hot, 64), one_hot)
    assert codec.encode(one_hot).counts.tolist() == [codec.GRID]


def test_wire_round_trip_and_size() -> None:
    quantized = codec.quantize(_distributions(4, shape=(1,), sharpness=1.0), 64)[0]
    message = convert.distribution_to_wire(quantized)
    assert torch.equal(convert.distribution_from_wire(message, VOCAB), quantized)
    assert message.ByteSize() <= 64 * 6 + 8  # int32 id + uint16 count per kept token
    exact = _distributions(5)[0, 0]
    assert torch.equal(convert.distribution_from_wire(convert.distribution_to_wire(exact), VOCAB), exact)
