"""Benchmarks that print figures (never timed tests): offline engine comparisons, later serving."""
