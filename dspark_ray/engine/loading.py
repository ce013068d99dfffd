"""Load HF causal-LM directories from local disk (never from a hub) and check they fit together."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # per-tensor loading bars drown the CLI's own output

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model directory is missing, unreadable or incompatible with its partner."""


def load_causal_lm(path: Path | str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    _check_no_sliding_window(model, path)
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


def context_limit(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def _check_no_sliding_window(model: PreTrainedModel, path: Path) -> None:
    # Rollback masks rejected cache slots instead of cropping them; a sliding-window layer would
    # count those slots towards its window, so such models are refused rather than silently wrong.
    config = model.config
    window = getattr(config, "sliding_window", None)
    enabled = getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or []
    if (window and enabled) or any(kind != "full_attention" for kind in layer_types):
        raise ModelLoadError(f"{path}: sliding-window attention layers are not supported yet")
