"""Load HF causal-LM directories from local disk (never from a hub) and check they fit together."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from dspark_ray.engine.attention_windows import AttentionWindows, UnsupportedAttention

hf_logging.disable_progress_bar()  # per-tensor loading bars drown the CLI's own output

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model directory is missing, unreadable or incompatible with its partner."""


def load_causal_lm(path: Path | str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    _check_attention_supported(model, path)
    return model.to(device).eval()


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(Path(path), local_files_only=True)


def vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_shared_vocabulary(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    """Drafts are scored by token id, so both models must use the same vocabulary."""
    target_vocab, draft_vocab = vocab_size(target), vocab_size(draft)
    if target_vocab != draft_vocab:
        raise ModelLoadError(
            f"draft vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}); "
            "the draft LM must share the target's tokenizer"
        )


def decoder(model: PreTrainedModel) -> torch.nn.Module:
    """The module that holds the decoder layers. `get_decoder` misses it where a class's base model
    attribute differs from its `base_model_prefix` (Llama4ForCausalLM: `model`, not `language_model`)."""
    found = model.get_decoder()
    inner = getattr(model, "model", None)
    if not hasattr(found, "layers") and hasattr(inner, "layers"):
        return inner
    return found


def context_limit(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def _check_attention_supported(model: PreTrainedModel, path: Path) -> None:
    """Refuse layers the engine cannot roll back (recurrent or compressed state), and hybrid models
    whose forward cannot take one attention mask per layer type (the engine applies sliding and
    chunked windows in those masks: `engine.attention_windows`)."""
    try:
        windows = AttentionWindows.of(model.config)
    except UnsupportedAttention as error:
        raise ModelLoadError(f"{path}: {error}") from error
    if windows.by_layer_type is not None and not _takes_mask_per_layer_type(model):
        raise ModelLoadError(f"{path}: {type(model).__name__} mixes attention layer types but takes one attention "
                             "mask for all of them; not supported yet")


def _takes_mask_per_layer_type(model: PreTrainedModel) -> bool:
    # HF's hybrid models build `causal_mask_mapping` (layer type -> mask) unless handed one
    return "causal_mask_mapping" in inspect.getsource(type(decoder(model)).forward)
