"""Tiny random-init HF checkpoints for engine tests: real directories on disk, loaded back through
`dspark_ray.engine.loading.load_causal_lm`, fp32, seeded.

Targets: Llama, Qwen3, Qwen3-MoE, Mixtral and DeepSeek-V3 (MLA attention, routed + shared experts),
2 layers each (`build_mtp_target`: the DeepSeek-V3 one with an MTP layer in its checkpoint); and the windowed families (`WINDOWED_ARCHITECTURES`): gpt-oss (sliding window
alternating with full attention, sinks, MoE), Gemma 4 text (interleaved sliding window, per-layer
embeddings, KV shared across layers, MoE) and Llama 4 text (chunked attention, NoPE layers with
attention temperature, MoE), with windows and chunks of `WINDOW` tokens so that short tests cross
them several times, with `initializer_range` raised so logits are far from flat (greedy argmaxes are not
near-ties). Each target's draft is the same architecture cut to its first layer, with that layer,
the embeddings, the final norm and the lm_head copied from the target: it shares the vocabulary and
agrees with the target on part of the tokens, so drafts are neither always accepted nor never.

This module knows nothing about the engine; it only makes models, tokenizers and references.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Gemma4TextConfig,
    GptOssConfig,
    Llama4TextConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
)

from dspark_ray.engine.loading import load_causal_lm

ARCHITECTURES = ("llama", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3")
WINDOWED_ARCHITECTURES = ("gpt_oss", "gemma4", "llama4")
WINDOW = 8  # sliding window / attention chunk of the windowed targets, in tokens
GEMMA4_GLOBAL_HEAD_DIM = 32  # Gemma 4's full-attention layers have heads of their own size
VOCAB_SIZE = 160
MAX_POSITION_EMBEDDINGS = 256
PAD_TOKEN_ID = 0


def target_config(arch: str, vocab_size: int = VOCAB_SIZE, max_position_embeddings: int = MAX_POSITION_EMBEDDINGS,
                  initializer_range: float = 0.2) -> PretrainedConfig:
    """A small config of `arch` (2 layers; 4 for Gemma 4 and Llama 4), no EOS, wide-spread weights, and
    no sliding window except in `WINDOWED_ARCHITECTURES`."""
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range, tie_word_embeddings=False,
        pad_token_id=PAD_TOKEN_ID, bos_token_id=None, eos_token_id=None,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=True, use_sliding_window=False)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "deepseek_v3":
        # MLA with small ranks; keys (nope + rope = 16) and values (12) have different head dims,
        # as in the real model. Layer 0 is dense, layer 1 routed (4 experts, top-2) + 1 shared.
        return DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            n_group=1, topk_group=1, first_k_dense_replace=1,
        )
    if arch == "mixtral_window":  # one sliding window for every layer, one mask (Mistral-style)
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)
    return _windowed_config(arch, common)


def _windowed_config(arch: str, common: dict) -> PretrainedConfig:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if arch == "gpt_oss":  # layer 0 sliding, layer 1 full
        return GptOssConfig(**common, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=WINDOW, rope_parameters=rope)
    if arch == "gemma4":
        # layers 2 and 3 reuse the keys and values of layers 0 (sliding) and 1 (full)
        return Gemma4TextConfig(
            **{**common, "num_hidden_layers": 4}, head_dim=16, global_head_dim=GEMMA4_GLOBAL_HEAD_DIM, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
            hidden_size_per_layer_input=8, vocab_size_per_layer_input=common["vocab_size"],
            enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    if arch == "llama4":
        # layers 0 and 2 chunked with rotary embeddings, 1 and 3 full without (NoPE), their
        # attention temperature stepping every 4 positions (floor_scale) instead of every 8192
        return Llama4TextConfig(
            **{**common, "num_hidden_layers": 4}, head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
            num_experts_per_tok=1, attention_chunk_size=WINDOW, no_rope_layer_interval=2, floor_scale=4,
            attn_scale=0.5)
    raise ValueError(f"unknown architecture {arch!r}")


def save_and_load(model: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """Round-trip through a real checkpoint directory, as the engine loads models."""
    model.save_pretrained(directory)
    return load_causal_lm(directory)


def build_target(arch: str, directory: Path, seed: int = 0, **config_overrides) -> PreTrainedModel:
    config = target_config(arch, **config_overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return save_and_load(model.eval(), directory)


def build_draft(target: PreTrainedModel, directory: Path, seed: int = 1,
                max_position_embeddings: int | None = None) -> PreTrainedModel:
    """The target cut to its first layer (two for Gemma 4 and Llama 4), weights copied: same
    vocabulary, partial agreement."""
    overrides = _draft_layers(target.config)
    if max_position_embeddings is not None:
        overrides["max_position_embeddings"] = max_position_embeddings
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draft = AutoModelForCausalLM.from_config(_derived_config(target, **overrides), dtype=torch.float32)
    missing, _ = draft.load_state_dict(target.state_dict(), strict=False)  # layer 1 is simply dropped
    assert not [key for key in missing if not key.endswith("inv_freq")], missing
    return save_and_load(draft.eval(), directory)


def _draft_layers(config: PretrainedConfig) -> dict:
    if config.model_type == "gemma4_text":
        # its first two layers (one sliding, one full: their heads differ in size), no layers reusing
        # others' keys, and no per-layer embeddings (their table is sized by the layer count)
        return {"num_hidden_layers": 2, "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0,
                "global_head_dim": GEMMA4_GLOBAL_HEAD_DIM}
    if config.model_type == "llama4_text":
        return {"num_hidden_layers": 2}  # one chunked layer, one NoPE (cut to one, it agrees too rarely)
    return {"num_hidden_layers": 1}


def build_other_vocab_draft(target: PreTrainedModel, directory: Path, vocab_size: int) -> PreTrainedModel:
    """A 1-layer draft with a different vocabulary (must be refused)."""
    config = _derived_config(target, num_hidden_layers=1, vocab_size=vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return save_and_load(draft.eval(), directory)


def _derived_config(target: PreTrainedModel, **overrides) -> PretrainedConfig:
    fields = target.config.to_dict()
    fields.pop("layer_types", None)  # derived from num_hidden_layers again
    fields.pop("no_rope_layers", None)
    fields.pop("per_layer_config", None)
    return type(target.config)(**{**fields, **overrides})


def save_tokenizer(directory: Path, vocab_size: int, eos_token_id: int | None = None) -> None:
    """A word-level tokenizer whose token i is the word 't<i>' (what `load_tokenizer` reads back)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = None if eos_token_id is None else f"t{eos_token_id}"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t1", pad_token=f"t{PAD_TOKEN_ID}",
                                   eos_token=eos)
    fast.save_pretrained(directory)


def build_mtp_target(directory: Path, seed: int = 0, **config_overrides) -> None:
    """A 2-layer DeepSeek-V3 target plus its MTP layer: a 3-layer model saved, its layer 2 kept in
    the checkpoint as the MTP block (MoE, like V3's layer 61), the MTP-only tensors added, and the
    config cut to 2 layers with `num_nextn_predict_layers: 1`."""
    config = target_config("deepseek_v3", **config_overrides)
    config.num_hidden_layers = 3
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    hidden = config.hidden_size
    generator = torch.Generator().manual_seed(seed + 1)
    extra = {
        "enorm.weight": 1 + 0.1 * torch.randn(hidden, generator=generator),
        "hnorm.weight": 1 + 0.1 * torch.randn(hidden, generator=generator),
        "eh_proj.weight": 0.2 * torch.randn(hidden, 2 * hidden, generator=generator),
        "shared_head.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=generator),
    }
    tensors.update({f"model.layers.2.{name}": tensor for name, tensor in extra.items()})
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    fields = json.loads((directory / "config.json").read_text())
    fields.update(num_hidden_layers=2, num_nextn_predict_layers=1)
    (directory / "config.json").write_text(json.dumps(fields))
    save_tokenizer(directory, config.vocab_size)


@dataclass(frozen=True)
class TinyModels:
    arch: str
    target: PreTrainedModel
    draft: PreTrainedModel
    target_dir: Path
    draft_dir: Path


def build_pair(arch: str, root: Path, seed: int = 0) -> TinyModels:
    target_dir, draft_dir = root / f"{arch}-target", root / f"{arch}-draft"
    target = build_target(arch, target_dir, seed)
    draft = build_draft(target, draft_dir)
    save_tokenizer(target_dir, VOCAB_SIZE)
    return TinyModels(arch, target, draft, target_dir, draft_dir)


@torch.no_grad()
def greedy_reference(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What the target alone says: HF `generate`, greedy, one prompt, no EOS."""
    output = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=None, pad_token_id=PAD_TOKEN_ID)
    tokens = output[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens, "the reference stopped early"
    return tokens


@torch.no_grad()
def draft_agreement(target: PreTrainedModel, draft: PreTrainedModel, sequences: list[list[int]]) -> float:
    """Fraction of positions of `sequences` where the draft's argmax equals the target's."""
    agree = total = 0
    for tokens in sequences:
        ids = torch.tensor([tokens])
        same = target(ids).logits.argmax(-1) == draft(ids).logits.argmax(-1)  # [1, T]
        agree += int(same.sum())
        total += same.numel()
    return agree / total


@torch.no_grad()
def top2_gap(model: PreTrainedModel, tokens: list[int]) -> float:
    """Logit gap between the two best next tokens after `tokens` (a near-tie is < 1e-5)."""
    top = model(torch.tensor([tokens])).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


def pair_builder(root: Path) -> Callable[[str], TinyModels]:
    """builder(arch): that architecture's target and draft under `root`, built once and reused."""
    built: dict[str, TinyModels] = {}

    def get(arch: str) -> TinyModels:
        if arch not in built:
            built[arch] = build_pair(arch, root)
        return built[arch]

    return get
