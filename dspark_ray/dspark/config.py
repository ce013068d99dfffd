"""What a DSpark drafter is: its shape, its heads, and the target it was trained for.

Saved as `config.json` in the drafter directory. The `target` part lets a loader refuse a drafter
built for another target (architecture, vocabulary, hidden size or weights differ); the drafter
reuses the target's token embeddings and lm_head, so a mismatch would silently produce garbage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dspark_ray.config import FrozenModel

MODEL_TYPE = "dspark"
SequentialHead = Literal["none", "vanilla", "gated", "rnn"]


class TargetSignature(FrozenModel):
    """The target a drafter belongs to; compared field by field at load time."""

    architecture: str = Field(description="HF architecture class of the target, e.g. DeepseekV3ForCausalLM.")
    vocab_size: int = Field(gt=0, description="Rows of the target's lm_head (the vocabulary).")
    hidden_size: int = Field(gt=0, description="Width of the target's hidden states and embeddings.")
    num_layers: int = Field(gt=0, description="Decoder layers of the target.")
    fingerprint: str = Field(description="sha256 over a few named target tensors (see fingerprint.py).")


class DSparkConfig(FrozenModel):
    model_type: Literal["dspark"] = Field(MODEL_TYPE, description="Marks a DSpark drafter directory.")
    target: TargetSignature = Field(description="The target this drafter was trained for.")
    target_layer_ids: tuple[int, ...] = Field(
        description="Target decoder layers whose outputs condition the drafter, strictly increasing.")
    block_size: int = Field(8, ge=1, le=64, description="Tokens drafted per block (one backbone forward).")
    hidden_size: int = Field(256, gt=0, description="Backbone width.")
    num_layers: int = Field(2, ge=1, description="Backbone transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads per backbone layer.")
    intermediate_size: int = Field(512, gt=0, description="MLP width of each backbone layer.")
    sequential_head: SequentialHead = Field(
        "vanilla",
        description=("Prefix-dependent bias added to the base logits: 'none' (the parallel-only ablation), "
                     "'vanilla' (low-rank Markov transition), 'gated' (Markov bias gated by the backbone "
                     "state), 'rnn' (GRU state over the drafted prefix)."))
    head_rank: int = Field(128, ge=1, description="Rank of the sequential head's low-rank projection.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base of the backbone's attention.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="Epsilon of the backbone's RMSNorms.")

    @model_validator(mode="after")
    def _check(self) -> "DSparkConfig":
        ids = list(self.target_layer_ids)
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.target.num_layers:
            raise ValueError(f"target_layer_ids {ids} must be strictly increasing within the target's "
                             f"{self.target.num_layers} layers")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size must split into num_heads heads of even width (RoPE)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def feature_size(self) -> int:
        """Width of the captured target features: the chosen layers concatenated."""
        return len(self.target_layer_ids) * self.target.hidden_size


def spread_layer_ids(num_layers: int, count: int = 3) -> tuple[int, ...]:
    """`count` layers spread from the second to the last (shallow to deep, as DFlash), e.g. 6 -> (1, 3, 5)."""
    if num_layers <= count:
        return tuple(range(num_layers))
    first, last = 1, num_layers - 1
    return tuple(sorted({round(first + i * (last - first) / (count - 1)) for i in range(count)}))
