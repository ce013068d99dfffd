"""Greedy losslessness on the windowed targets (gpt-oss, Gemma 4, Llama 4: sliding-window and
chunked attention, windows of `WINDOW` tokens): a ragged batch of 8 prompts whose prompts and
generations cross the window several times, every drafter, draft lengths 1 to 8. Each output
equals the target alone (HF `generate`, greedy, that prompt by itself), token for token, 100%.

Never loosen these checks to "most tokens match": a mismatch is a defect.
"""

from __future__ import annotations

import pytest

from dspark_ray.engine.sequence import GenerationRequest
from harness import make_drafter, make_engine
from test_greedy_identity import assert_matches_target_alone, assert_speculated
from tiny_models import WINDOW, WINDOWED_ARCHITECTURES

PROMPTS = (
    (7,),
    (5, 6, 7),
    (1, 2, 3, 1, 2),
    (20, 21, 20, 21, 20, 21, 20, 21),  # repeats, so the n-gram drafter proposes at once
    tuple(range(60, 69)),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8),
    tuple(range(30, 47)),  # 17 tokens
    tuple(range(100, 120)),  # 20 tokens
)
MAX_TOKENS = (48, 41, 56, 44, 50, 43, 47, 52)  # sequences leave the batch at different steps

# (drafter, draft length): every length from 1 to 8 (6 in test_greedy_identity), each drafter at least once
CASES = (("none", 1), ("ngram", 2), ("model-confidence", 3), ("model-off", 4), ("model-heuristic", 5),
         ("echo", 7), ("model-off", 8))


@pytest.mark.parametrize(("drafter", "num_speculative_tokens"), CASES)
@pytest.mark.parametrize("arch", WINDOWED_ARCHITECTURES)
def test_ragged_batch_of_8_equals_target_alone(tiny, reference, arch, drafter, num_speculative_tokens):
    assert min(len(p) + n for p, n in zip(PROMPTS, MAX_TOKENS)) > 5 * WINDOW
    models = tiny(arch)
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, num_speculative_tokens),
                         num_speculative_tokens)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    assert_speculated(seqs, drafter)
