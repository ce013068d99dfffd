"""Identify a target model: architecture, sizes, and a fingerprint of some of its weights.

The fingerprint hashes the token embeddings, the lm_head and the final norm, rounded to bfloat16
first so a target loaded in float32 or bfloat16 (the bundled one is stored in bfloat16) gets the
same fingerprint. It knows nothing about drafters; `io.py` compares signatures.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import PreTrainedModel

from dspark_ray.dspark.config import TargetSignature
from dspark_ray.engine.feature_capture import decoder_layers
from dspark_ray.engine.loading import decoder


def fingerprint_tensors(target: PreTrainedModel) -> dict[str, torch.Tensor]:
    tensors = {
        "input_embeddings": target.get_input_embeddings().weight,
        "output_embeddings": target.get_output_embeddings().weight,
    }
    norm = getattr(decoder(target), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        tensors["final_norm"] = norm.weight
    return tensors


def target_fingerprint(target: PreTrainedModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in fingerprint_tensors(target).items():
        rounded = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(rounded.shape)).encode())
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def target_signature(target: PreTrainedModel) -> TargetSignature:
    architectures = getattr(target.config, "architectures", None) or [type(target).__name__]
    return TargetSignature(
        architecture=architectures[0],
        vocab_size=target.get_output_embeddings().weight.shape[0],
        hidden_size=target.get_input_embeddings().weight.shape[1],
        num_layers=len(decoder_layers(target)),
        fingerprint=target_fingerprint(target),
    )
