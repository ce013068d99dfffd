"""The single-process engine: models, caches, drafters and the decode loop (no Ray)."""
