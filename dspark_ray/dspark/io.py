"""Save and load a DSpark drafter as an HF-style directory: config.json + model.safetensors + README.md.

Loading needs the target: the drafter borrows its embeddings and lm_head, and its config records
the target it was trained for. Any mismatch (architecture, vocabulary, hidden size, layer count,
weight fingerprint) is a `ModelLoadError` that says which field differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from dspark_ray.dspark.config import MODEL_TYPE, DSparkConfig
from dspark_ray.dspark.model import DSparkModel, TargetParts
from dspark_ray.dspark.signature import target_signature
from dspark_ray.engine.loading import DTYPES, ModelLoadError

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


def target_parts(target: PreTrainedModel) -> TargetParts:
    return TargetParts(target.get_input_embeddings(), target.get_output_embeddings())


def new_dspark_model(config: DSparkConfig, target: PreTrainedModel) -> DSparkModel:
    check_target(config, target, "the drafter config")
    return DSparkModel(config, target_parts(target))


def save_dspark(model: DSparkModel, directory: Path | str, card: str | None = None,
                storage_dtype: torch.dtype = torch.float32) -> None:
    """Write the drafter's own weights (never the target's) in `storage_dtype`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(model.config.model_dump_json(indent=2) + "\n")
    state = {name: tensor.detach().to("cpu", storage_dtype).contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if card is not None:
        (directory / CARD_NAME).write_text(card)


def read_dspark_config(directory: Path | str) -> DSparkConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a DSpark drafter directory (no {CONFIG_NAME})")
    fields = json.loads(path.read_text())
    if fields.get("model_type") != MODEL_TYPE:
        raise ModelLoadError(f"{directory} is not a DSpark drafter (model_type {fields.get('model_type')!r}, "
                             f"expected {MODEL_TYPE!r})")
    try:
        return DSparkConfig.model_validate(fields)
    except ValidationError as error:
        raise ModelLoadError(f"{path}: invalid DSpark config: {error}") from error


def check_target(config: DSparkConfig, target: PreTrainedModel, what: str) -> None:
    expected, actual = config.target, target_signature(target)
    for field in ("architecture", "vocab_size", "hidden_size", "num_layers", "fingerprint"):
        if getattr(expected, field) != getattr(actual, field):
            raise ModelLoadError(
                f"{what} was trained for another target: {field} is {getattr(expected, field)!r} there but "
                f"{getattr(actual, field)!r} in the loaded target")


def load_dspark(directory: Path | str, target: PreTrainedModel, dtype: str = "float32") -> DSparkModel:
    """Load a drafter for `target` (checked), in eval mode, on the target's device."""
    config = read_dspark_config(directory)
    check_target(config, target, f"the DSpark drafter in {directory}")
    model = DSparkModel(config, target_parts(target))
    state = load_file(str(Path(directory) / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{directory}: weights do not match the config (missing {missing}, "
                             f"unexpected {unexpected})")
    device = target.get_input_embeddings().weight.device
    return model.to(device=device, dtype=DTYPES[dtype]).eval()
