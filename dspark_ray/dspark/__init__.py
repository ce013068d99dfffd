"""The DSpark drafter: config, network (parallel backbone + sequential and confidence heads), context
cache and HF-style save/load. The engine's `Drafter` for it lives in engine/drafters/dspark.py."""
