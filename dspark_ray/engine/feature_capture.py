"""Capture the hidden states of chosen decoder layers during a forward, and only those.

Forward hooks on the chosen layers keep their outputs; `output_hidden_states=True` would
materialise every layer's states. The DSpark drafter is conditioned on these features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from dspark_ray.engine.loading import decoder


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(decoder(model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers to capture")
    return layers


class LayerCapture:
    """Hooks live only inside `recording()`, so other users of the same model object (HF `generate`,
    another runner, a benchmark row) never pay for them and captures never pile up."""

    def __init__(self, model: PreTrainedModel, layer_ids: list[int]) -> None:
        layers = decoder_layers(model)
        if not layer_ids or any(not 0 <= i < len(layers) for i in layer_ids):
            raise ValueError(f"capture layers {layer_ids} outside the target's {len(layers)} layers")
        self.layer_ids = list(layer_ids)
        self._layers = [layers[layer_id] for layer_id in self.layer_ids]
        self._outputs: dict[int, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = [layer.register_forward_hook(self._hook(layer_id))
                   for layer_id, layer in zip(self.layer_ids, self._layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer_id: int):
        def keep(module, args, output) -> None:
            self._outputs[layer_id] = output[0] if isinstance(output, tuple) else output
        return keep

    def take(self) -> torch.Tensor:
        """The captured states of the last forward, layers concatenated. # [B, T, L*H]"""
        features = torch.cat([self._outputs[layer_id] for layer_id in self.layer_ids], dim=-1)
        self._outputs.clear()
        return features.float()
