"""The character bound past which a prompt surely exceeds the context: certain where it is given."""

from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dspark_ray.config import REFERENCE_DIR
from dspark_ray.engine.loading import load_tokenizer
from dspark_ray.serving.prompt_bound import NFC_MAX_JOINED, max_prompt_chars


@pytest.fixture(scope="module")
def reference_tokenizer():
    if not (REFERENCE_DIR / "target" / "tokenizer.json").is_file():
        pytest.skip("no bundled tokenizer")
    return load_tokenizer(REFERENCE_DIR / "target")


def _byte_level(normalizer=None, pre_tokenizer=None) -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())} | {"abcdef": 256}
    tokenizer = Tokenizer(models.BPE(vocab, [], ignore_merges=True))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_byte_level_bound_is_the_longest_entry(reference_tokenizer) -> None:
    longest = max(len(t) for t in reference_tokenizer.get_vocab())
    assert max_prompt_chars(reference_tokenizer, 2048) == 2048 * longest
    assert max_prompt_chars(_byte_level(), 100) == 100 * len("abcdef")


@pytest.mark.parametrize("text", ["a" * 5000, "ab " * 2000, "é中😀" * 1000, " " * 5000, "\n\t" * 2500])
def test_no_text_has_fewer_tokens_than_the_bound_assumes(reference_tokenizer, text: str) -> None:
    longest = max_prompt_chars(reference_tokenizer, 1)
    assert len(reference_tokenizer.encode(text, add_special_tokens=False)) * longest >= len(text)


def test_nfc_joins_at_most_four_code_points() -> None:
    split = pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated")
    tokenizer = _byte_level(normalizers.NFC(), pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel()]))
    assert max_prompt_chars(tokenizer, 100) == 100 * len("abcdef") * NFC_MAX_JOINED


@pytest.mark.parametrize("normalizer, pre_tokenizer", [
    (normalizers.BertNormalizer(), None),  # deletes control characters
    (normalizers.Strip(), None),
    (None, pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel()])),  # drops spaces
    (None, pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.ByteLevel()])),
    (None, pre_tokenizers.Metaspace()),  # not byte-level
], ids=["bert", "strip", "whitespace", "split_removed", "metaspace"])
def test_no_bound_where_text_may_vanish(normalizer, pre_tokenizer) -> None:
    assert max_prompt_chars(_byte_level(normalizer, pre_tokenizer), 100) is None
