"""A crash simulated at the engine level: the engine is rebuilt and every unfinished request is added
again as the continuation of its committed tokens (`num_resumed_tokens`). Seeded sampled requests
then finish with exactly the text of an uninterrupted run, with the draft LM and with DSpark (each
step's draws derive from the seed and the committed count, `engine.sequence`; the replay draws no
first token, `Verifier.resume`), whether the replay runs them together or each alone. With
DSpark's confidence schedule a draft is cut by one schedule for the whole batch, so a sampled
text depends on its neighbours: the replay is exact when the batch replays together, not alone
(deploy/README.md, Faults)."""

from __future__ import annotations

import json

import pytest
import torch

from dspark_ray.config import DEFAULT_TARGET_DIR, REFERENCE_DIR, EngineConfig
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.sequence import GenerationRequest, Sequence

pytestmark = pytest.mark.engine

MAX_TOKENS = 40
SAMPLINGS = (SamplingParams(temperature=1.0, seed=11), SamplingParams(temperature=0.8, top_p=0.9, seed=12),
             SamplingParams(temperature=1.2, top_k=20, seed=13), SamplingParams())  # the last one greedy


@pytest.fixture(scope="module", params=[("model", "fixed"), ("dspark", "fixed"), ("dspark", "confidence")],
                ids=lambda param: "-".join(param))
def setup(request):
    if not (DEFAULT_TARGET_DIR / "config.json").is_file():
        pytest.skip("bundled models not present")
    drafter, schedule = request.param
    # Always drafting: the governor leaves sampled sequences alone, but keeps the greedy one's steps cheap to reason about.
    config = EngineConfig(drafter=drafter, verification_schedule=schedule, num_speculative_tokens=6, max_batch_size=4,
                          load_aware_drafting=False)
    models = load_models(config)
    lines = (REFERENCE_DIR / "prompts" / "heldout.jsonl").read_text().splitlines()[:len(SAMPLINGS)]
    requests = [GenerationRequest(models.tokenizer.encode(json.loads(line)["prompt"]), sampling,
                                  max_tokens=MAX_TOKENS, ignore_eos=True)
                for line, sampling in zip(lines, SAMPLINGS)]
    return config, models, requests


def replayed(request: GenerationRequest, committed: list[int]) -> GenerationRequest:
    """What the serving layer adds after a crash (`CompletionRequest.resumed`)."""
    return GenerationRequest(request.prompt_token_ids + committed, request.sampling, request.max_tokens - len(committed),
                             ignore_eos=request.ignore_eos, num_resumed_tokens=len(committed))


@pytest.mark.parametrize("steps_before_crash", [1, 4])
@pytest.mark.parametrize("together", [True, False])
def test_a_replay_continues_with_the_text_of_an_uninterrupted_run(setup, steps_before_crash, together):
    config, models, requests = setup
    if config.verification_schedule == "confidence" and not together:
        pytest.skip("the batch's schedule cuts each draft: a replay alone drafts other lengths (module docstring)")
    uninterrupted = [seq.output_token_ids for seq in build_engine(config, models).generate(requests)]

    crashed = build_engine(config, models)
    seqs = [crashed.add_request(request) for request in requests]
    for _ in range(steps_before_crash):
        crashed.step()
    committed = [list(seq.output_token_ids) for seq in seqs]
    assert all(0 < len(tokens) < MAX_TOKENS for tokens in committed)
    batches = [list(range(len(requests)))] if together else [[row] for row in range(len(requests))]
    continued: dict[int, list[int]] = {}
    for rows in batches:
        engine = build_engine(config, models)  # a fresh engine: no cache, no RNG state survives
        replays = engine.generate([replayed(requests[row], committed[row]) for row in rows])
        continued.update((row, seq.completion_token_ids) for row, seq in zip(rows, replays))

    assert [continued[row] for row in range(len(requests))] == uninterrupted
    # a replay that drew a first token at its prefill would not have drafted in its first step
    assert all(seq.stats.num_steps > 0 for seq in replays)


def test_seeded_output_is_reproducible_and_seed_dependent(setup):
    config, models, requests = setup
    first = [seq.output_token_ids for seq in build_engine(config, models).generate(requests)]
    again = [seq.output_token_ids for seq in build_engine(config, models).generate(requests)]
    reseeded = [GenerationRequest(r.prompt_token_ids, SamplingParams(temperature=1.0, seed=99), MAX_TOKENS,
                                  ignore_eos=True) for r in requests[:1]]
    other = build_engine(config, models).generate(reseeded)[0].output_token_ids
    assert first == again and other != first[0]


def test_a_sequence_draws_by_its_committed_count_and_restore_redraws_the_same():
    seq = Sequence.create(0, GenerationRequest([1, 2, 3], SamplingParams(temperature=1.0, seed=5)))
    mark = seq.mark()
    first = torch.rand(4, generator=seq.generator)
    assert not torch.equal(torch.rand(4, generator=seq.generator), first)  # one stream within a step
    seq.restore(mark)
    assert torch.equal(torch.rand(4, generator=seq.generator), first)  # a retried step draws again
    seq.output_token_ids.append(9)
    next_step = torch.rand(4, generator=seq.generator)
    twin = Sequence.create(1, GenerationRequest([1, 2, 3, 9], SamplingParams(temperature=1.0, seed=5)))
    assert torch.equal(torch.rand(4, generator=twin.generator), next_step)  # implied by seed and count
    assert not torch.equal(next_step, first)
