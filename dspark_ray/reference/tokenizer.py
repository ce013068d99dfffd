"""Byte-level BPE tokenizer of the reference models, trained on the corpus's train split.

Byte-level with no prefix space and no normaliser, so `decode(encode(text)) == text` for any
source text. Wrapped as a `PreTrainedTokenizerFast` carrying a small chat template, and saved
with `save_pretrained` so `AutoTokenizer.from_pretrained(dir)` works offline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (EOS_TOKEN, *ROLE_TOKENS)

# Each message is `<|role|>\n{content}\n`; a generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _new_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the raw byte-level BPE (deterministic for a fixed text order)."""
    tokenizer = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The HF tokenizer: `<|endoftext|>` is bos, eos, pad and unk; the chat template is set."""
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def build_tokenizer(texts: Iterable[str], out_dir: Path) -> PreTrainedTokenizerFast:
    """Train, wrap and save the tokenizer to `out_dir`; return the HF tokenizer."""
    hf_tokenizer = wrap(train_bpe(texts))
    hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer
