"""Engine behaviour around the lossless core: stop conditions, seeded reproducibility, per-request
stats, vocabulary checks, the batch KV cache's verbs, and n-gram lookup tables."""

from __future__ import annotations

import pytest
import torch

from dspark_ray.config import EngineConfig
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.drafters.ngram import lookup_continuation
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.kv_cache import BatchKVCache
from dspark_ray.engine.loading import ModelLoadError, check_shared_vocabulary
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import FinishReason, GenerationRequest
from harness import make_drafter, make_engine, mismatch_report
from tiny_models import (
    ARCHITECTURES,
    PAD_TOKEN_ID,
    build_draft,
    build_other_vocab_draft,
    build_target,
    greedy_reference,
    save_tokenizer,
)

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def one_char(ids: list[int]) -> str:
    """A fake tokenizer: one letter per token."""
    return "".join(chr(97 + i % 26) for i in ids)


def two_chars(ids: list[int]) -> str:
    """A fake tokenizer: two characters per token, so a stop string can end inside a token."""
    return "".join(chr(97 + i % 26) + chr(65 + i % 26) for i in ids)


def generate_one(engine, request: GenerationRequest):
    (seq,) = engine.generate([request])
    return seq


# ---------------------------------------------------------------- stop conditions


@pytest.mark.parametrize("drafter", ["echo", "model-off", "ngram", "none"])
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 16])
def test_max_tokens_is_the_exact_length(tiny, reference, drafter, max_tokens):
    """Even a drafter whose every token is accepted (echo) never overshoots max_tokens."""
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 6), 6)

    seq = generate_one(engine, GenerationRequest(PROMPT, max_tokens=max_tokens))

    assert seq.output_token_ids == reference("llama", PROMPT, max_tokens)
    assert seq.finish_reason == FinishReason.LENGTH


def first_new_token(tokens: list[int], start: int) -> int:
    """Index of the first token at or after `start` that does not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("drafter", ["echo", "model-off", "ngram", "none"])
def test_eos_stops_and_is_included(tiny, reference, drafter):
    models = tiny("llama")
    expected = reference("llama", PROMPT, 40)
    eos_index = first_new_token(expected, 9)  # deep inside a 7-token echo block or later
    eos = expected[eos_index]
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 6), 6, eos_token_ids=[eos])

    seq = generate_one(engine, GenerationRequest(PROMPT, max_tokens=40))

    assert seq.output_token_ids == expected[: eos_index + 1]
    assert seq.finish_reason == FinishReason.STOP


def test_eos_as_the_first_token_and_ignore_eos(tiny, reference):
    models = tiny("llama")
    expected = reference("llama", PROMPT, 24)
    engine = make_engine(models.target, make_drafter("echo", models.target, None, 6), 6, eos_token_ids=[expected[0]])

    first, ignoring = engine.generate([GenerationRequest(PROMPT, max_tokens=24),
                                       GenerationRequest(PROMPT, max_tokens=24, ignore_eos=True)])

    assert first.output_token_ids == expected[:1] and first.finish_reason == FinishReason.STOP
    assert first.stats.num_steps == 0  # it stopped at the prefill
    assert ignoring.output_token_ids == expected and ignoring.finish_reason == FinishReason.LENGTH


ECHO_K = 3  # with the echo drafter the prefill emits token 0 and step s tokens 4s-3 .. 4s


def find_stop(text: str, starts: list[int], length: int) -> int:
    """The first start whose `length` characters occur in `text` there first."""
    return next(start for start in starts if text.find(text[start:start + length]) == start)


@pytest.mark.parametrize("where", ["inside-one-block", "spanning-two-steps"])
def test_stop_string_one_char_tokens(tiny, reference, where):
    models = tiny("llama")
    expected = reference("llama", PROMPT, 40)
    text = one_char(expected)
    if where == "inside-one-block":  # tokens i, i+1 both in step s's block [4s-3, 4s]
        starts = [i for s in range(2, 9) for i in range(4 * s - 3, 4 * s)]
    else:  # token 4s ends step s, token 4s+1 starts step s+1
        starts = [4 * s for s in range(2, 9)]
    start = find_stop(text, starts, 2)
    engine = make_engine(models.target, make_drafter("echo", models.target, None, ECHO_K), ECHO_K, decode=one_char)
    blocks = []  # output length after each step, to check the steps were as planned
    seq = engine.add_request(GenerationRequest(PROMPT, max_tokens=40, stop=(text[start:start + 2],)))
    while engine.has_unfinished():
        engine.step()
        blocks.append(len(seq.output_token_ids))

    assert blocks[:-1] == [1 + 4 * s for s in range(len(blocks) - 1)]  # every draft accepted
    assert seq.output_token_ids == expected[: start + 2]  # cut after the token that completes it
    assert seq.finish_reason == FinishReason.STOP and seq.stop_text_end == start


def test_stop_string_ending_inside_a_token(tiny, reference):
    models = tiny("llama")
    expected = reference("llama", PROMPT, 40)
    text = two_chars(expected)
    start = find_stop(text, [2 * i + 1 for i in range(4, 30)], 2)  # 2nd char of token i, 1st of token i+1
    engine = make_engine(models.target, make_drafter("model-off", models.target, models.draft, 4), 4,
                         decode=two_chars)

    seq = generate_one(engine, GenerationRequest(PROMPT, max_tokens=40, stop=("zz-never", text[start:start + 2])))

    token = (start + 1) // 2  # the token holding the stop string's last character stays
    assert seq.output_token_ids == expected[: token + 1]
    assert seq.finish_reason == FinishReason.STOP and seq.stop_text_end == start


@pytest.mark.parametrize("drafter", ["model-off", "none"])
def test_a_resumed_request_ends_as_if_uninterrupted(tiny, reference, drafter):
    """A replay after a crash holds the tokens already emitted at the end of its prompt
    (num_resumed_tokens): greedy decoding goes on with the same tokens, max_tokens counts the rest,
    and a stop string whose first character came before the split ends it at the same place."""
    models = tiny("llama")
    expected = reference("llama", PROMPT, 40)
    text = two_chars(expected)
    start = find_stop(text, [2 * i + 1 for i in range(4, 30)], 2)  # 2nd char of token i, 1st of token i+1
    split = (start + 1) // 2  # tokens 0..i were emitted before the crash
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 4), 4, decode=two_chars)

    stopped, full = engine.generate([
        GenerationRequest(PROMPT + expected[:split], max_tokens=40 - split, stop=(text[start:start + 2],),
                          num_resumed_tokens=split),
        GenerationRequest(PROMPT + expected[:split], max_tokens=40 - split, num_resumed_tokens=split)])

    assert stopped.completion_token_ids == expected[: split + 1] and stopped.output_token_ids == [expected[split]]
    assert stopped.finish_reason == FinishReason.STOP and stopped.stop_text_end == start
    assert full.completion_token_ids == expected and full.finish_reason == FinishReason.LENGTH


def test_stop_strings_resolve_as_if_tokens_came_one_at_a_time(tiny, reference):
    """Two stop strings complete in one block: the one that completes first (token by token) wins,
    even though the other starts earlier, so the output does not depend on the drafter."""
    models = tiny("llama")
    expected = reference("llama", PROMPT, 40)
    text = one_char(expected)
    # long: tokens i..i+3 (one echo block [4s-3, 4s]); short: tokens i+1..i+2, completes first.
    start = next(i for i in (4 * s - 3 for s in range(2, 9))
                 if text.find(text[i:i + 4]) == i and text.find(text[i + 1:i + 3]) == i + 1)
    stops = (text[start:start + 4], text[start + 1:start + 3])
    outputs = []
    for drafter in ("echo", "none"):
        engine = make_engine(models.target, make_drafter(drafter, models.target, None, ECHO_K), ECHO_K,
                             decode=one_char)
        seq = generate_one(engine, GenerationRequest(PROMPT, max_tokens=40, stop=stops))
        outputs.append((seq.output_token_ids, seq.stop_text_end))

    assert outputs[0] == outputs[1] == (expected[: start + 3], start + 1)


def test_max_tokens_below_one_is_refused(tiny):
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("none", models.target, None, 1), 1)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(GenerationRequest(PROMPT, max_tokens=0))


def test_stop_strings_need_a_decoder(tiny):
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("none", models.target, None, 1), 1)
    with pytest.raises(ValueError, match="tokenizer"):
        generate_one(engine, GenerationRequest(PROMPT, max_tokens=4, stop=("x",)))


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A target with 48 positions (and a tokenizer) and a draft with only 32, on disk."""
    root = tmp_path_factory.mktemp("short-context")
    target = build_target("llama", root / "target", max_position_embeddings=48)
    build_draft(target, root / "draft", max_position_embeddings=32)
    save_tokenizer(root / "target", target.config.vocab_size)
    return root


def test_context_limit_ends_with_length_and_never_exceeds_positions(short_context, monkeypatch):
    config = EngineConfig(target=short_context / "target", draft=short_context / "draft", drafter="model",
                          num_speculative_tokens=6, adaptive_speculation="off",
                          load_aware_drafting=False)  # draft at every step: this is about the draft's limit
    models = load_models(config)
    engine = build_engine(config, models)
    overruns = []  # (tokens a cache would hold, its model's positions) whenever the first exceeds the second
    prepare = BatchKVCache.prepare

    def checked(self, token_lists, pad_token_id, dtype, max_position):
        longest = max(len(cached) + len(new) for cached, new in zip(self.cached_tokens, token_lists))
        if longest > max_position:
            overruns.append((longest, max_position))
        return prepare(self, token_lists, pad_token_id, dtype, max_position)

    monkeypatch.setattr(BatchKVCache, "prepare", checked)
    prompts = [list(range(10, 40)), list(range(50, 60)), list(range(60, 107))]  # 30, 10 and 47 tokens

    seqs = engine.generate([GenerationRequest(p, max_tokens=100) for p in prompts])

    assert not overruns  # no position was ever clamped, in the target or the draft
    for seq, prompt in zip(seqs, prompts):
        assert seq.finish_reason == FinishReason.LENGTH
        assert len(prompt) + len(seq.output_token_ids) == 48
        expected = greedy_reference(models.target, prompt, 48 - len(prompt))
        assert seq.output_token_ids == expected, mismatch_report(models.target, prompt, seq.output_token_ids, expected)
    assert seqs[0].stats.num_accepted_tokens > 0  # drafting ran while the draft's 32 positions lasted
    with pytest.raises(ValueError, match="no room"):
        engine.add_request(GenerationRequest(list(range(48)), max_tokens=1))


# ---------------------------------------------------------------- seeded sampling


SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)


@pytest.mark.parametrize("drafter", ["model-off", "model-confidence", "ngram"])
def test_same_seed_same_output(tiny, drafter):
    models = tiny("qwen3_moe")
    requests = [GenerationRequest(PROMPT, sampling=SAMPLED, max_tokens=30),
                GenerationRequest([1, 2, 3, 1, 2, 3], sampling=SamplingParams(temperature=1.0, seed=3), max_tokens=25)]
    outputs = [[seq.output_token_ids for seq in make_engine(
        models.target, make_drafter(drafter, models.target, models.draft, 4), 4).generate(requests)]
        for _ in range(2)]
    other_seed = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 4), 4).generate(
        [GenerationRequest(PROMPT, sampling=SamplingParams(**{**vars(SAMPLED), "seed": 12}), max_tokens=30)])

    assert outputs[0] == outputs[1]
    assert other_seed[0].output_token_ids != outputs[0][0]


@pytest.mark.parametrize("drafter", ["model-off", "model-heuristic", "ngram"])
def test_seeded_output_does_not_depend_on_the_batch(tiny, drafter):
    models = tiny("llama")
    mine = GenerationRequest(PROMPT, sampling=SAMPLED, max_tokens=30)
    neighbours = [
        GenerationRequest([3], max_tokens=12),  # greedy
        GenerationRequest(list(range(60, 80)), sampling=SamplingParams(temperature=1.0, seed=5), max_tokens=35),
        GenerationRequest([1, 2, 3, 1, 2, 3, 1], sampling=SamplingParams(temperature=0.5, top_k=3), max_tokens=20),
    ]

    def engine():
        return make_engine(models.target, make_drafter(drafter, models.target, models.draft, 4), 4)

    alone = engine().generate([mine])[0].output_token_ids
    in_batch = engine().generate(neighbours[:2] + [mine] + neighbours[2:])[2].output_token_ids
    late = engine()  # joins while the neighbours are mid-generation
    for request in neighbours:
        late.add_request(request)
    late.step()
    late.step()
    joined = late.add_request(mine)
    while late.has_unfinished():
        late.step()

    assert in_batch == alone
    assert joined.output_token_ids == alone
    greedy = engine().generate([mine, neighbours[0]])[1]  # greedy rows stay exact in a sampled batch
    assert greedy.output_token_ids == greedy_reference(models.target, [3], 12)


@pytest.mark.parametrize("drafter", ["model-off", "ngram"])
def test_abort_running_and_waiting_requests(tiny, reference, drafter):
    models = tiny("deepseek_v3")
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 3), 3, max_batch_size=2)
    kept = engine.add_request(GenerationRequest(PROMPT, max_tokens=30))
    running = engine.add_request(GenerationRequest([1, 2, 3, 1, 2, 3], max_tokens=30))
    waiting = engine.add_request(GenerationRequest([4, 5], max_tokens=30))
    for _ in range(3):
        engine.step()

    engine.abort([running.seq_id, waiting.seq_id])
    late = engine.add_request(GenerationRequest([9, 9, 8], max_tokens=10))
    while engine.has_unfinished():
        engine.step()

    assert kept.output_token_ids == reference("deepseek_v3", PROMPT, 30)
    assert late.output_token_ids == reference("deepseek_v3", [9, 9, 8], 10)
    assert running.finish_reason is None and waiting.output_token_ids == []


# ---------------------------------------------------------------- per-request stats


def test_stats_without_drafts(tiny):
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("none", models.target, None, 6), 6)
    seq = generate_one(engine, GenerationRequest(PROMPT, max_tokens=20))

    assert seq.stats.num_steps == 19  # the prefill emits the first token and is no step
    assert seq.stats.num_draft_tokens == seq.stats.num_accepted_tokens == 0
    assert seq.stats.mean_acceptance_length == 1.0


def test_stats_with_every_draft_accepted(tiny):
    models = tiny("llama")
    engine = make_engine(models.target, make_drafter("echo", models.target, None, 3), 3)
    seq = generate_one(engine, GenerationRequest(PROMPT, max_tokens=13))  # 1 + 3 steps x (3 + 1)

    assert (seq.stats.num_steps, seq.stats.num_draft_tokens, seq.stats.num_accepted_tokens) == (3, 9, 9)
    assert seq.stats.num_accepted_per_position == [3, 3, 3]
    assert seq.stats.mean_acceptance_length == 4.0


@pytest.mark.parametrize("drafter", ["model-off", "model-confidence", "model-heuristic", "ngram"])
def test_stats_add_up(tiny, drafter):
    models = tiny("mixtral")
    engine = make_engine(models.target, make_drafter(drafter, models.target, models.draft, 5), 5)
    seqs = engine.generate([GenerationRequest(PROMPT, max_tokens=33),
                            GenerationRequest([1, 2, 3, 1, 2, 3], max_tokens=21)])

    for seq in seqs:
        stats = seq.stats
        assert len(seq.output_token_ids) == 1 + stats.num_steps + stats.num_accepted_tokens
        assert stats.num_accepted_tokens <= stats.num_draft_tokens <= 5 * stats.num_steps
        assert stats.mean_acceptance_length == pytest.approx(1 + stats.num_accepted_tokens / stats.num_steps)
        per_position = stats.num_accepted_per_position
        assert sum(per_position) == stats.num_accepted_tokens
        assert all(a >= b for a, b in zip(per_position, per_position[1:])) and len(per_position) <= 5
    assert sum(seq.stats.num_accepted_tokens for seq in seqs) > 0


# ---------------------------------------------------------------- vocabulary


def test_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
    models = tiny("llama")
    other = build_other_vocab_draft(models.target, tmp_path / "other-draft", vocab_size=128)

    check_shared_vocabulary(models.target, models.draft)  # same vocabulary: fine
    with pytest.raises(ModelLoadError, match="vocabulary"):
        check_shared_vocabulary(models.target, other)
    with pytest.raises(ModelLoadError, match="vocabulary"):
        load_models(EngineConfig(target=models.target_dir, draft=tmp_path / "other-draft", drafter="model"))


# ---------------------------------------------------------------- BatchKVCache


@torch.no_grad()
def fresh_next_logits(model, tokens: list[int]) -> torch.Tensor:  # [V]
    return model(torch.tensor([tokens])).logits[0, -1].float()


def assert_rows_match_fresh_prefill(runner: CausalLMRunner, model, expected_cached: dict[int, list[int]]) -> None:
    """Each row holds exactly its tokens, and one more token gives the logits of a fresh prefill."""
    cache = runner.cache
    assert {seq_id: runner.cached_tokens(seq_id) for seq_id in runner.seq_ids} == expected_cached
    assert cache.slot_valid.sum(1).tolist() == [len(expected_cached[seq_id]) for seq_id in runner.seq_ids]
    probe = {seq_id: [(7 * seq_id + 3) % 100 + 1] for seq_id in runner.seq_ids}
    logits = runner.forward(probe)  # [B, 1, V]
    for row, seq_id in enumerate(runner.seq_ids):
        fresh = fresh_next_logits(model, expected_cached[seq_id] + probe[seq_id])
        torch.testing.assert_close(logits[row, 0], fresh, atol=1e-4, rtol=1e-4)
        runner.cache.truncate(row, len(expected_cached[seq_id]))  # undo the probe


SEQS = {0: [11, 12, 13, 14, 15], 1: [21], 2: [31, 32, 33, 34, 35, 36, 37, 38, 39]}


def filled_runner(model) -> CausalLMRunner:
    """Three rows of different lengths, then extra tokens fed to two of them."""
    runner = CausalLMRunner(model, PAD_TOKEN_ID)
    runner.add(SEQS)
    runner.forward({0: [16, 17, 18], 2: [40]})
    return runner


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_truncate(tiny, arch):
    model = tiny(arch).target
    runner = filled_runner(model)
    runner.cache.truncate(0, 6)  # keep one of the three extra tokens
    runner.cache.truncate(2, 3)  # deep into the prompt
    runner.cache.truncate(1, 5)  # past its end: nothing to do

    assert_rows_match_fresh_prefill(runner, model, {0: SEQS[0] + [16], 1: SEQS[1], 2: SEQS[2][:3]})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_select_and_merge(tiny, arch):
    model = tiny(arch).target
    runner = filled_runner(model)
    runner.cache.truncate(0, 6)
    runner.remove([1])  # select rows 0 and 2
    assert_rows_match_fresh_prefill(runner, model, {0: SEQS[0] + [16], 2: SEQS[2] + [40]})

    runner.add({5: [51, 52], 6: list(range(60, 80))})  # merge: new rows with more slots than the old
    assert_rows_match_fresh_prefill(runner, model, {0: SEQS[0] + [16], 2: SEQS[2] + [40], 5: [51, 52],
                                                    6: list(range(60, 80))})
    runner.remove([0, 2, 5, 6])
    runner.add({9: [1, 2, 3]})  # into an emptied cache
    assert_rows_match_fresh_prefill(runner, model, {9: [1, 2, 3]})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_joined_rows_prefill_in_a_forward_beside_other_rows(tiny, arch):
    """`join` gives new sequences empty rows; one forward then prefills them while other rows
    append their tokens (the engine's fused prefill), and every row ends as a fresh prefill would."""
    model = tiny(arch).target
    runner = filled_runner(model)
    runner.cache.truncate(0, 6)  # a hole in row 0, as a rejected draft leaves
    runner.join([5, 6])
    assert runner.cache.num_rows == 5 and runner.cached_tokens(5) == []

    logits = runner.forward({5: list(range(60, 80)), 0: [16], 6: [51, 52]})  # [3, T, V] in that order

    torch.testing.assert_close(logits[0, 19], fresh_next_logits(model, list(range(60, 80))), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2, 1], fresh_next_logits(model, [51, 52]), atol=1e-4, rtol=1e-4)
    assert_rows_match_fresh_prefill(runner, model, {0: SEQS[0] + [16, 16], 1: SEQS[1], 2: SEQS[2] + [40],
                                                    5: list(range(60, 80)), 6: [51, 52]})
    with pytest.raises(ValueError, match="already present"):
        runner.join([6])


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("fused_prefill, beyond_the_limit, forwards_per_admitting_step", [
    (True, 0, 1),  # prefilled in the verification's forward
    (True, 1, 2),  # too long: a forward of its own
    (False, -10, 2),
])
def test_an_admission_beside_running_sequences_costs_no_forward_of_its_own(tiny, arch, fused_prefill, beyond_the_limit,
                                                                          forwards_per_admitting_step):
    models = tiny(arch)
    engine = make_engine(models.target, make_drafter("model-off", models.target, models.draft, 3), 3)
    engine.fused_prefill = fused_prefill
    prompt_length = engine.verifier.fused_prompt_limit + beyond_the_limit
    forwards = []
    forward = engine.verifier.runner._forward
    engine.verifier.runner._forward = lambda cache, token_lists: forwards.append(len(token_lists)) or forward(
        cache, token_lists)
    engine.add_request(GenerationRequest(PROMPT, max_tokens=20))
    engine.step()  # nothing runs yet: the prefill is the step
    engine.step()
    assert len(forwards) == 2
    late = engine.add_request(GenerationRequest(list(range(40, 40 + prompt_length)), max_tokens=20))
    engine.step()

    assert len(forwards) == 2 + forwards_per_admitting_step
    assert len(late.output_token_ids) == 1 and late in engine.running  # its first token, from that step
    while engine.has_unfinished():
        engine.step()
    assert late.output_token_ids == greedy_reference(models.target, list(range(40, 40 + prompt_length)), 20)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_compact(tiny, arch):
    model = tiny(arch).target
    runner = filled_runner(model)
    runner.cache.truncate(0, 6)
    runner.forward({0: [19, 20], 1: [22, 23, 24, 25]})  # fills behind the holes
    runner.cache.truncate(1, 3)
    expected = {0: SEQS[0] + [16, 19, 20], 1: SEQS[1] + [22, 23], 2: SEQS[2] + [40]}
    slots_before = runner.cache.num_slots

    runner.cache.compact()

    assert runner.cache.num_slots == 10 < slots_before  # the longest row, no holes
    valid = runner.cache.slot_valid
    assert torch.equal(valid, torch.arange(10)[None, :] < valid.sum(1, keepdim=True))  # valid slots first
    assert_rows_match_fresh_prefill(runner, model, expected)


def cache_snapshot(runner: CausalLMRunner) -> tuple:
    layers = runner.cache._layers()
    return ([layer.keys.clone() for layer in layers], [layer.values.clone() for layer in layers],
            runner.cache.slot_valid.clone(), [list(tokens) for tokens in runner.cache.cached_tokens])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_forward_runs_over_the_named_rows_only(tiny, arch, monkeypatch):
    model = tiny(arch).target
    runner = filled_runner(model)
    keys_before, values_before, valid_before, _ = cache_snapshot(runner)
    tokens_fed = []
    model_forward = type(model).forward

    def spied(self, *args, **kwargs):
        tokens_fed.append(kwargs["input_ids"].numel())  # the runner passes keywords
        return model_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spied)
    logits = runner.forward({2: [41, 42], 0: [19]})  # named out of row order
    monkeypatch.undo()

    assert runner.packs and tokens_fed == [3]  # row 1 was not padded in, nor row 0 padded to two tokens
    torch.testing.assert_close(logits[0, 1], fresh_next_logits(model, SEQS[2] + [40, 41, 42]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1, 0], fresh_next_logits(model, SEQS[0] + [16, 17, 18, 19]),
                               atol=1e-4, rtol=1e-4)
    old_slots = valid_before.shape[1]
    assert not runner.cache.slot_valid[1, old_slots:].any()  # the unnamed row got holes, bit-identical KV
    assert torch.equal(runner.cache.slot_valid[1, :old_slots], valid_before[1])
    for layer, keys, values in zip(runner.cache._layers(), keys_before, values_before):
        assert torch.equal(layer.keys[1, :, :old_slots], keys[1])
        assert torch.equal(layer.values[1, :, :old_slots], values[1])
    assert_rows_match_fresh_prefill(runner, model, {0: SEQS[0] + [16, 17, 18, 19], 1: SEQS[1],
                                                    2: SEQS[2] + [40, 41, 42]})


@pytest.mark.parametrize(("feed", "batch_size"), [
    ({2: [41], 1: [22], 0: [19]}, 3),  # every row, out of row order
    ({2: [41], 0: [19]}, 2),  # some rows: the named rows alone
    ({2: [41, 42]}, 1),
])
def test_a_forward_returns_rows_in_the_order_named(tiny, monkeypatch, feed, batch_size):
    model = tiny("llama").target
    runner = filled_runner(model)
    cached = {0: SEQS[0] + [16, 17, 18], 1: SEQS[1], 2: SEQS[2] + [40]}
    batch_sizes = []
    model_forward = type(model).forward

    def spied(self, *args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return model_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spied)
    logits = runner.forward(feed)
    monkeypatch.undo()

    assert batch_sizes == [batch_size] and logits.shape[0] == len(feed)
    for row, (seq_id, tokens) in enumerate(feed.items()):
        fresh = fresh_next_logits(model, cached[seq_id] + tokens)
        torch.testing.assert_close(logits[row, len(tokens) - 1], fresh, atol=1e-4, rtol=1e-4)
    assert_rows_match_fresh_prefill(runner, model, {seq_id: cached[seq_id] + feed.get(seq_id, [])
                                                    for seq_id in cached})


@pytest.mark.parametrize("feed", [{0: [19, 20]}, {0: [19, 20], 1: [21], 2: [22, 23, 24]}],
                         ids=["some-rows", "all-rows"])
def test_a_failed_forward_leaves_the_cache_as_it_was(tiny, monkeypatch, feed):
    model = tiny("deepseek_v3").target
    runner = filled_runner(model)
    before = cache_snapshot(runner)
    model_forward = type(model).forward

    def fails_after_the_cache_grew(self, *args, **kwargs):
        model_forward(self, *args, **kwargs)  # every layer has appended its slots by now
        raise RuntimeError("device lost")

    monkeypatch.setattr(type(model), "forward", fails_after_the_cache_grew)
    with pytest.raises(RuntimeError, match="device lost"):
        runner.forward(feed)

    after = cache_snapshot(runner)
    for tensors_before, tensors_after in zip(before[:2], after[:2]):
        assert all(torch.equal(a, b) for a, b in zip(tensors_before, tensors_after))
    assert torch.equal(before[2], after[2]) and before[3] == after[3]


# ---------------------------------------------------------------- n-gram lookup


@pytest.mark.parametrize(
    ("tokens", "max_ngram", "min_ngram", "num_tokens", "expected"),
    [
        ([1, 2, 3, 1, 2], 4, 1, 3, [3, 1, 2]),  # tail [1, 2] matched at 0
        ([1, 2, 3, 1, 2], 4, 1, 1, [3]),  # only as many as asked
        ([1, 2, 3, 1, 2], 4, 1, 0, []),  # none asked
        ([1, 2, 3, 4, 2], 4, 1, 3, [3, 4, 2]),  # only the 1-gram [2] matches
        ([1, 2, 3, 4, 2], 4, 2, 3, []),  # ... which min_ngram forbids
        ([5, 1, 6, 1, 7, 1], 4, 1, 2, [7, 1]),  # the most recent earlier match wins
        ([9, 8, 1, 7, 3, 1, 5, 8, 1], 4, 1, 2, [7, 3]),  # the longest n-gram wins: [8, 1] at 1, not [1] at 5
        ([9, 8, 1, 7, 3, 1, 5, 8, 1], 1, 1, 2, [5, 8]),  # ... unless max_ngram allows only [1]
        ([4, 4, 4, 4], 2, 1, 3, [4]),  # the latest match overlaps the tail: one token left to copy
        ([1, 2, 3], 4, 1, 3, []),  # no repeat at all
        ([7], 4, 1, 3, []),  # a single token has no earlier occurrence
    ],
)
def test_lookup_continuation(tokens, max_ngram, min_ngram, num_tokens, expected):
    assert lookup_continuation(tokens, max_ngram, min_ngram, num_tokens) == expected
