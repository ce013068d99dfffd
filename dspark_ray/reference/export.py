"""Write a trained model as a complete Hugging Face directory.

Weights are stored in bfloat16 to keep the bundled files small, while `config.json` declares
float32, so `AutoModelForCausalLM.from_pretrained(dir)` without a dtype loads float32 weights
(bfloat16 values upcast exactly).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

STORAGE_DTYPE = torch.bfloat16


def _generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    eos = tokenizer.eos_token_id
    return GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False, max_new_tokens=128
    )


def _declare_float32(out_dir: Path) -> None:
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _drop_load_flags(out_dir: Path) -> None:
    """A tokenizer loaded from disk saves how it was loaded; keep the files load-independent."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> None:
    """Save weights (bfloat16), config (float32), generation config and tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = copy.deepcopy(model).to(STORAGE_DTYPE)
    stored.generation_config = _generation_config(tokenizer)
    stored.save_pretrained(str(out_dir), safe_serialization=True)
    _declare_float32(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    _drop_load_flags(out_dir)
