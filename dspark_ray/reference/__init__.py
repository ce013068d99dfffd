"""The recipe that builds the bundled reference models (tokenizer, target, draft LM)."""
