"""The most characters a prompt may have before it surely holds more tokens than the context.

A model server rejects a longer prompt without tokenizing it. The bound must never reject a
prompt that fits, so it is given only for tokenizers where it is certain: byte-level BPE (every
token covers at most as many bytes as its vocabulary entry has characters, and a character is at
least one byte), with no normalizer or NFC (which joins at most 4 code points into one: the longest
canonical decomposition), and pre-tokenizers that split without deleting. Other tokenizers get
no bound; their prompts are bounded by the request-body limit. This module knows nothing about
requests or HTTP.
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase

NFC_MAX_JOINED = 4  # max(len(unicodedata.normalize("NFD", c))) over all code points
SAFE_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Split"}


def max_prompt_chars(tokenizer: PreTrainedTokenizerBase, context_limit: int) -> int | None:
    """Characters beyond which a prompt surely exceeds `context_limit` tokens; None: not certain."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    pre_tokenizers = _pre_tokenizers(spec.get("pre_tokenizer"))
    if "ByteLevel" not in {p["type"] for p in pre_tokenizers} or not all(map(_keeps_text, pre_tokenizers)):
        return None
    longest_token = max(len(token) for token in tokenizer.get_vocab())
    return context_limit * longest_token * (1 if normalizer is None else NFC_MAX_JOINED)


def _pre_tokenizers(spec: dict | None) -> list[dict]:
    if spec is None:
        return []
    if spec["type"] == "Sequence":
        return [p for inner in spec["pretokenizers"] for p in _pre_tokenizers(inner)]
    return [spec]


def _keeps_text(pre_tokenizer: dict) -> bool:
    return pre_tokenizer["type"] in SAFE_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"
