"""Greedy losslessness, end to end: whatever the architecture, drafter, draft length, batch
composition or cache layout, each sequence's output equals the target alone (HF `generate`,
greedy, that prompt by itself), token for token, 100%, on fp32 CPU.

Never loosen these checks to "most tokens match": a mismatch is a defect (or, on a proven
near-tie of the target's top-2 logits below 1e-5, a reason to change the seed and say so).
"""

from __future__ import annotations

import pytest

from dspark_ray.engine.kv_cache import BatchKVCache
from dspark_ray.engine.sequence import FinishReason, GenerationRequest
from harness import DRAFT_QUALITY, DRAFTERS, make_drafter, make_engine, mismatch_report
from tiny_models import ARCHITECTURES, WINDOWED_ARCHITECTURES, draft_agreement

# The windowed targets (sliding-window and chunked attention) run these too; their ragged batches
# of 8 at every draft length are in test_windowed_identity.
ALL_ARCHITECTURES = ARCHITECTURES + WINDOWED_ARCHITECTURES

PROMPTS = (
    (7,),  # a single token
    (5, 6, 7, 8, 9, 10, 11, 12),
    (1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3),  # repeats, so the n-gram drafter proposes at once
    (20, 21, 20, 21, 20, 21),
    tuple(range(30, 47)),  # 17 tokens
)
MAX_TOKENS = (40, 24, 33, 29, 36)  # sequences leave the batch at different steps


def assert_matches_target_alone(tiny, reference, arch, seqs, prompts, max_tokens) -> None:
    target = tiny(arch).target
    for seq, prompt, n in zip(seqs, prompts, max_tokens, strict=True):
        expected = reference(arch, prompt, n)
        assert seq.output_token_ids == expected, mismatch_report(target, list(prompt), seq.output_token_ids, expected)


def assert_speculated(seqs, drafter: str) -> tuple[int, int]:
    """Speculation really happened: drafts were kept, and with a draft LM also rejected (so caches
    were rolled back). Returns (drafted, accepted) over `seqs`."""
    num_drafted = sum(seq.stats.num_draft_tokens for seq in seqs)
    num_accepted = sum(seq.stats.num_accepted_tokens for seq in seqs)
    if drafter != "none":
        assert num_accepted > 0
    if drafter.startswith("model"):
        assert num_drafted > num_accepted
    return num_drafted, num_accepted


@pytest.mark.parametrize("num_speculative_tokens", [1, 3, 6])
@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_batch_equals_target_alone(tiny, reference, compactions, arch, drafter, num_speculative_tokens):
    models = tiny(arch)
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, num_speculative_tokens),
                         num_speculative_tokens)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    assert all(seq.finish_reason == FinishReason.LENGTH for seq in seqs)
    for seq in seqs:  # the prefill emits one token, every step accepted + 1
        assert len(seq.output_token_ids) == 1 + seq.stats.num_steps + seq.stats.num_accepted_tokens
    num_drafted, num_accepted = assert_speculated(seqs, drafter)
    if (drafter, num_speculative_tokens) == ("model-off", 6):
        # 7 slots appended per step, ~1.2 kept: the holes pass the compaction threshold mid-run.
        assert any(after < before for before, after in compactions), compactions
        sequences = [list(p) + seq.output_token_ids for p, seq in zip(PROMPTS, seqs)]
        first_accepted = sum((seq.stats.num_accepted_per_position or [0])[0] for seq in seqs)
        DRAFT_QUALITY[arch] = (
            f"argmax agreement {draft_agreement(models.target, models.draft, sequences):.2f}; with K=6: "
            f"first draft token accepted {first_accepted / sum(seq.stats.num_steps for seq in seqs):.2f}, "
            f"all drafts {num_accepted / num_drafted:.2f}, "
            f"mean acceptance length {sum(seq.stats.mean_acceptance_length for seq in seqs) / len(seqs):.2f}")


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_fully_accepted_blocks_equal_target_alone(tiny, reference, arch):
    """The target drafting for itself: long accepted blocks, the bonus token every step."""
    models = tiny(arch)
    engine = make_engine(models.target, make_drafter("echo", models.target, None, 6), 6)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    num_drafted = sum(seq.stats.num_draft_tokens for seq in seqs)
    assert sum(seq.stats.num_accepted_tokens for seq in seqs) >= 0.9 * num_drafted


def test_tiny_drafts_agree_partially(tiny, reference):
    """The drafts must be neither useless nor perfect, or the tests above prove little."""
    for arch in ALL_ARCHITECTURES:
        models = tiny(arch)
        sequences = [list(p) + reference(arch, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
        agreement = draft_agreement(models.target, models.draft, sequences)
        assert 0.1 < agreement < 0.9, (arch, agreement)


# Requests join while others run and leave at different max_tokens. With max_batch_size 4,
# the step-3 arrivals queue until a slot frees. step -> [(prompt, max_tokens)] added before it.
SCHEDULE = {
    0: [((9, 8, 7, 6, 5), 30), ((3,), 12)],
    2: [((40, 41, 40, 41, 40, 41, 40, 41, 40), 20)],
    3: [((60, 61, 62), 1), ((70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83), 25), ((90, 91), 8)],
    6: [((100, 101, 102, 100, 101), 16)],
}


@pytest.mark.parametrize("fused_prefill", [True, False])  # prompts prefilled in the verification's forward, or apart
@pytest.mark.parametrize("drafter", ["model-off", "ngram"])
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_continuous_batching_equals_target_alone(tiny, reference, arch, drafter, fused_prefill):
    models = tiny(arch)
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 3), 3, max_batch_size=4)
    engine.fused_prefill = fused_prefill
    added, finished_at, batch_sizes = [], {}, []
    step = 0
    while engine.has_unfinished() or step <= max(SCHEDULE):
        for prompt, max_tokens in SCHEDULE.get(step, []):
            seq = engine.add_request(GenerationRequest(list(prompt), max_tokens=max_tokens))
            added.append((seq, prompt, max_tokens))
        for seq in engine.step():
            assert seq.seq_id not in finished_at, "a sequence finished twice"
            finished_at[seq.seq_id] = step
        batch_sizes.append(len(engine.running))
        step += 1

    seqs, prompts, max_tokens = zip(*added)
    assert_matches_target_alone(tiny, reference, arch, seqs, prompts, max_tokens)
    assert set(finished_at) == {seq.seq_id for seq in seqs}
    assert len(set(finished_at.values())) >= 4, finished_at  # they left at different steps
    assert max(batch_sizes) == 4  # the batch filled up, so later arrivals waited
    assert finished_at[seqs[0].seq_id] > 3  # the first request was still running when others joined


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_compaction_after_every_step_changes_nothing(tiny, reference, compactions, monkeypatch, arch):
    """Compact the target's and the draft's caches at every sync, not only past the threshold."""
    monkeypatch.setattr(BatchKVCache, "needs_compaction", lambda self: True)
    models = tiny(arch)
    engine = make_engine(models.target, make_drafter("model-heuristic", models.target, models.draft, 6), 6)

    seqs = engine.generate([GenerationRequest(list(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS)])

    assert_matches_target_alone(tiny, reference, arch, seqs, PROMPTS, MAX_TOKENS)
    assert sum(after < before for before, after in compactions) >= 10, compactions
