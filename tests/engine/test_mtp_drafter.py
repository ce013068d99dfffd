"""The MTP drafter (`--drafter mtp`) on a tiny DeepSeek-V3 target whose checkpoint ships an MTP
layer the way DeepSeek-V3 does (decoder layer `num_hidden_layers`, with enorm / hnorm / eh_proj /
shared_head.norm): greedy identity with HF `generate`, drafts equal to a plain no-cache MTP forward
written here, and the error for a target without one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dspark_ray.config import EngineConfig
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.drafters.mtp import MTPDrafter, load_mtp
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.loading import ModelLoadError, load_causal_lm
from dspark_ray.engine.runner import CausalLMRunner
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.engine.stopping import StopRules
from dspark_ray.engine.verifier import TargetVerifier
from harness import mismatch_report
from tiny_models import PAD_TOKEN_ID, VOCAB_SIZE, build_mtp_target, greedy_reference, save_tokenizer

pytestmark = pytest.mark.engine

PROMPTS = [[5, 9, 13, 2, 7], [3, 3], list(range(10, 40)), [44], [7, 100, 21, 8, 8, 150, 2, 66, 1]]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def mtp_target(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mtp-target")
    build_mtp_target(directory)
    target = load_causal_lm(directory)
    return directory, target, load_mtp(target, directory)


@pytest.fixture(scope="module")
def references(mtp_target):
    _, target, _ = mtp_target
    return [greedy_reference(target, prompt, MAX_TOKENS) for prompt in PROMPTS]


def make_engine(target, drafter, num_speculative_tokens: int, max_batch_size: int = 8) -> SpeculativeEngine:
    runner = CausalLMRunner(target, PAD_TOKEN_ID, capture_layers=[target.config.num_hidden_layers - 1])
    return SpeculativeEngine(TargetVerifier(runner), drafter, StopRules(set(), 256, None), num_speculative_tokens,
                             max_batch_size)


def run(engine: SpeculativeEngine, prompts, max_tokens: int = MAX_TOKENS):
    return engine.generate([GenerationRequest(prompt, SamplingParams(), max_tokens) for prompt in prompts])


@pytest.mark.parametrize("num_speculative_tokens", [1, 2, 3, 4])
def test_greedy_identity_ragged_batch(mtp_target, references, num_speculative_tokens):
    _, target, mtp = mtp_target
    drafter = MTPDrafter(mtp, target, num_speculative_tokens, PAD_TOKEN_ID)
    seqs = run(make_engine(target, drafter, num_speculative_tokens), PROMPTS)
    for prompt, seq, expected in zip(PROMPTS, seqs, references):
        assert seq.output_token_ids == expected, mismatch_report(target, prompt, seq.output_token_ids, expected)
    assert all(seq.stats.num_draft_tokens > 0 for seq in seqs)  # every sequence really drafted


def test_continuous_batching_identity(mtp_target, references):
    """Fewer slots than prompts: sequences join and leave while others draft (narrowed MTP forwards)."""
    _, target, mtp = mtp_target
    seqs = run(make_engine(target, MTPDrafter(mtp, target, 3, PAD_TOKEN_ID), 3, max_batch_size=2), PROMPTS)
    assert [seq.output_token_ids for seq in seqs] == references


class Recording(MTPDrafter):
    """Keeps (committed tokens, drafts) of every proposal."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proposals: list[tuple[list[int], list[int]]] = []

    def propose(self, seqs, max_draft_tokens, time_budget_s=None):
        proposal = super().propose(seqs, max_draft_tokens, time_budget_s)
        self.proposals.extend((list(seq.token_ids), proposal.drafts(row)) for row, seq in enumerate(seqs))
        return proposal


@torch.no_grad()
def plain_mtp_drafts(target, checkpoint: dict[str, torch.Tensor], tokens: list[int], num_drafts: int) -> list[int]:
    """Greedy MTP drafts after `tokens`, written out from the checkpoint's tensors with no cache:
    entry i = eh_proj(cat(enorm(emb(t_{i+1})), hnorm(h_i))) through the block (causal, all
    entries recomputed each time), shared_head.norm, lm_head; the chain feeds its own output state."""
    layer = "model.layers.2."
    hidden_states = target(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states[-1][0]  # [n-1, H]
    block = AutoModelForCausalLM.from_config(_block_config(target)).model.layers[0]
    missing, _ = block.load_state_dict(
        {name.removeprefix(layer): tensor for name, tensor in checkpoint.items()
         if name.startswith(layer) and name.split(".")[3] not in ("enorm", "hnorm", "eh_proj", "shared_head")},
        strict=False)
    assert sorted(missing) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"], missing
    _fuse_experts(block, checkpoint, layer)
    rotary = target.model.rotary_emb

    def rms(x, name):
        return checkpoint[layer + name] * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + target.config.rms_norm_eps)

    next_tokens, states, drafts = list(tokens[1:]), list(hidden_states), []
    for _ in range(num_drafts):
        embeds = target.model.embed_tokens(torch.tensor([next_tokens]))[0]  # [m, H]
        inputs = torch.cat([rms(embeds, "enorm.weight"), rms(torch.stack(states), "hnorm.weight")], -1)
        x = (inputs @ checkpoint[layer + "eh_proj.weight"].T)[None]  # [1, m, H]
        positions = torch.arange(x.shape[1])[None]
        out = rms(block(x, position_embeddings=rotary(x, positions), position_ids=positions)[0],
                  "shared_head.norm.weight")  # [m, H]
        draft = int(target.lm_head(out[-1]).argmax())
        drafts.append(draft)
        next_tokens.append(draft)
        states.append(out[-1])
    return drafts


def _block_config(target):
    fields = {**target.config.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 0}
    return type(target.config)(**fields)


def _fuse_experts(block, checkpoint: dict[str, torch.Tensor], layer: str) -> None:
    """Per-expert checkpoint tensors into transformers' fused expert parameters."""
    experts = block.mlp.experts
    count = experts.gate_up_proj.shape[0]
    with torch.no_grad():
        for e in range(count):
            name = f"{layer}mlp.experts.{e}."
            experts.gate_up_proj[e] = torch.cat([checkpoint[name + "gate_proj.weight"], checkpoint[name + "up_proj.weight"]])
            experts.down_proj[e] = checkpoint[name + "down_proj.weight"]
    block.mlp.gate.e_score_correction_bias.copy_(checkpoint[f"{layer}mlp.gate.e_score_correction_bias"])


def test_drafts_equal_plain_mtp_forward(mtp_target):
    """Every proposal (first draft and chained ones) is what the checkpoint's MTP layer says."""
    directory, target, mtp = mtp_target
    drafter = Recording(mtp, target, 3, PAD_TOKEN_ID)
    run(make_engine(target, drafter, 3), PROMPTS[:3], max_tokens=12)
    checkpoint = load_file(directory / "model.safetensors")
    assert len(drafter.proposals) > 10
    for tokens, drafts in drafter.proposals:
        assert drafts == plain_mtp_drafts(target, checkpoint, tokens, len(drafts)), tokens


def test_target_without_mtp_layer_is_refused(tmp_path, mtp_target):
    _, target, _ = mtp_target
    target.save_pretrained(tmp_path)  # only the 2 decoder layers are saved
    save_tokenizer(tmp_path, VOCAB_SIZE)
    with pytest.raises(ModelLoadError, match="has no MTP layer"):
        load_models(EngineConfig(target=tmp_path, drafter="mtp"))


def test_engine_from_config(mtp_target, references):
    directory, _, _ = mtp_target
    config = EngineConfig(target=directory, drafter="mtp", num_speculative_tokens=2, max_batch_size=8)
    seqs = run(build_engine(config, load_models(config)), PROMPTS)
    assert [seq.output_token_ids for seq in seqs] == references


def test_sampled_drafts_are_seeded_and_carry_their_distributions(mtp_target):
    """Sampled rows draw their drafts from their own generators: the same seeds give the same
    output whatever runs beside them (speculative sampling verifies the drafts' distributions)."""
    _, target, mtp = mtp_target
    sampling = [SamplingParams(temperature=0.8, seed=seed) for seed in range(3)]

    def sample(prompts, params):
        drafter = Recording(mtp, target, 3, PAD_TOKEN_ID)
        engine = make_engine(target, drafter, 3)
        seqs = engine.generate([GenerationRequest(p, s, 16) for p, s in zip(prompts, params)])
        return [seq.output_token_ids for seq in seqs], seqs

    together, seqs = sample(PROMPTS[:3], sampling)
    alone = [sample([prompt], [params])[0][0] for prompt, params in zip(PROMPTS[:3], sampling)]
    assert together == alone
    assert all(seq.stats.num_draft_tokens > 0 for seq in seqs)


def test_bench_offline_has_an_mtp_row(mtp_target, tmp_path):
    from dspark_ray.bench.offline import main

    directory, _, _ = mtp_target
    out = tmp_path / "offline.json"
    assert main(["--target", str(directory), "--device", "cpu", "--num-prompts", "1", "--max-tokens", "6",
                 "--repetitions", "1", "--threads", "1", "--out", str(out)]) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["engine_mtp"]["identical_to_hf_greedy"] and rows["engine_mtp"]["runs"][0]["num_tokens"] == 6


def test_deepseek_v4_is_refused_with_the_reason(tmp_path):
    from transformers import DeepseekV4Config

    config = DeepseekV4Config(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    target = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelLoadError, match="DeepSeek-V4's MTP layer"):
        load_mtp(target, tmp_path)


@pytest.fixture(scope="module")
def small_mtp(tmp_path_factory):
    """A 16-token DeepSeek-V3 target with an MTP layer, its MTP module, and its exact sampling laws."""
    from test_sampling_lossless import NUM_POSITIONS, PROMPT, SAMPLINGS, target_alone_laws

    directory = tmp_path_factory.mktemp("small-mtp")
    build_mtp_target(directory, vocab_size=16, max_position_embeddings=64, initializer_range=0.3)
    target = load_causal_lm(directory)
    laws = target_alone_laws(target, PROMPT, SAMPLINGS["temperature-1"], NUM_POSITIONS)
    return target, load_mtp(target, directory), laws


def sample_with_mtp(small_mtp, seed_base: int) -> tuple[torch.Tensor, float]:
    from test_sampling_lossless import NUM_POSITIONS, NUM_SAMPLES, PROMPT, SAMPLINGS

    target, mtp, _ = small_mtp
    engine = make_engine(target, MTPDrafter(mtp, target, 3, PAD_TOKEN_ID), 3, max_batch_size=500)
    params = vars(SAMPLINGS["temperature-1"])
    seqs = engine.generate([GenerationRequest(PROMPT, SamplingParams(**{**params, "seed": seed_base + i}), NUM_POSITIONS)
                            for i in range(NUM_SAMPLES)])
    acceptance = sum(seq.stats.num_accepted_tokens for seq in seqs) / max(1, sum(seq.stats.num_draft_tokens for seq in seqs))
    return torch.tensor([seq.output_token_ids for seq in seqs]), acceptance


@pytest.mark.slow
def test_sampled_output_distribution_equals_target_alone(small_mtp):
    """tests/engine/test_sampling_lossless.py's chi-square test, with MTP drafts."""
    from test_sampling_lossless import ALPHA, observed_counts, p_values

    outputs, acceptance = sample_with_mtp(small_mtp, seed_base=900_000)
    laws = small_mtp[2]
    for position, law in enumerate(laws):
        assert int(observed_counts(outputs, position)[law == 0].sum()) == 0, position
    p = p_values(outputs, laws)
    assert min(p) > ALPHA, f"p-values at positions 0..3: {p}"
    # random MTP weights: about one draft in ten accepted, hundreds over the run: every branch of the rule ran
    assert 0.05 < acceptance < 0.9, acceptance


@pytest.mark.slow
def test_sampling_negative_control_is_rejected(small_mtp, monkeypatch):
    """A lossy rule (recovered token from target_probs, not the residual) fails the same test."""
    from dspark_ray.core import verification
    from test_sampling_lossless import p_values

    monkeypatch.setattr(verification, "recovered_probs", lambda draft_probs, target_probs: target_probs)
    outputs, _ = sample_with_mtp(small_mtp, seed_base=7_000_000)
    p = p_values(outputs, small_mtp[2])
    assert min(p[1:]) < 1e-4, f"p-values at positions 0..3: {p}"  # a drafted position gives it away


def test_an_undone_step_leaves_no_trace(mtp_target, references, monkeypatch):
    """A step that fails after the MTP drafted (in the verification rule, once) is undone and
    stepped again in halves: every output is still the target's, and every later proposal is still
    what the checkpoint's MTP layer says after the committed tokens."""
    from dspark_ray.engine import verifier as verifier_module

    directory, target, mtp = mtp_target
    verify, fired = verifier_module._verify, []

    def failing_once(seqs, proposal, logits):
        if not fired and any(len(seq.output_token_ids) >= 8 for seq in seqs) and proposal.draft_token_ids.numel():
            fired.append(len(drafter.proposals))
            raise RuntimeError("a transient fault")
        return verify(seqs, proposal, logits)

    monkeypatch.setattr(verifier_module, "_verify", failing_once)
    drafter = Recording(mtp, target, 3, PAD_TOKEN_ID)
    seqs = run(make_engine(target, drafter, 3), PROMPTS)
    assert len(fired) == 1
    assert [seq.output_token_ids for seq in seqs] == references
    checkpoint = load_file(directory / "model.safetensors")
    later = [(tokens, drafts) for tokens, drafts in drafter.proposals[fired[0]:] if drafts]
    assert len(later) >= len(PROMPTS)
    for tokens, drafts in later:
        assert drafts == plain_mtp_drafts(target, checkpoint, tokens, len(drafts)), tokens
