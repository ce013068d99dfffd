"""Faults that are no one sequence's doing: the engine fails (or replays) a step as a whole for them.

Any other exception from a step is blamed on the sequences in it and isolated
(`SpeculativeEngine.step`). It knows nothing about what failed or how it recovers.
"""

from __future__ import annotations


class EngineUnavailable(RuntimeError):
    """A part every sequence needs is down: the step fails as a whole, no sequence is to blame."""


class VerifierStateLost(EngineUnavailable):
    """The verifier lost every sequence it held (its workers died and are being replaced): the
    sequences are intact on the engine's side and can be added again."""
