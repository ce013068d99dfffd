"""Constants shared by the serving tests and their conftest (imported as a top-level module)."""

from __future__ import annotations

# For stand-in tokenizers without one; the bundled tokenizer brings its own.
FALLBACK_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
                          "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
ALICE_KEY = "sk-alice-0123456789"  # tiny_app tenant without a quota
BOB_KEY = "sk-bob-0123456789"  # tiny_app tenant with max_ongoing_requests 1
