"""Load only the target tensors a DSpark drafter borrows, for a process that must not hold the target.

A draft worker hosts the drafter on a cheap device; the target (in production a large MoE) lives on
the tensor-parallel target workers. `load_hollow_target` builds the target's skeleton on the meta
device from its config alone (no memory, no weights), learns from it the parameter names of
`get_input_embeddings()` / `get_output_embeddings()` and of the tensors the target fingerprint
hashes (`signature.fingerprint_tensors`: those two and the final norm), and reads just those from
the target's safetensors (`model.safetensors`, or the shards named by
`model.safetensors.index.json`). Everything else stays on the meta device.

The result is the target model object with those few parameters real, so `io.load_dspark` (and
its `check_target`) runs on it unchanged: the full `TargetSignature` (architecture, vocabulary,
hidden size, layer count from the skeleton, fingerprint from the real tensors) is checked, exactly
as against a fully loaded target. Only the borrowed modules outlive the load (the drafter keeps
references to the embedding and lm_head, not to the skeleton). Calling the hollow model's forward
fails on meta tensors: it is a source of parts, not a model.

Tied embeddings (no lm_head tensor on disk) stay tied: both modules get the same loaded parameter.
Checkpoint names are taken from the skeleton as they are, or without the model's
`base_model_prefix` (checkpoints saved from the base model); transformers' per-architecture key
conversions are not applied, which is fine for embeddings and lm_heads of the usual architectures.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from dspark_ray.dspark.signature import fingerprint_tensors
from dspark_ray.engine.loading import DTYPES, ModelLoadError

SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


def load_hollow_target(directory: Path | str, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """The target with only its input embeddings, output embeddings (lm_head) and final norm loaded,
    in `dtype` on `device`; every other parameter is on the meta device."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    owners = _owners(model)
    wanted = {id(param): param for param in _borrowed_parameters(model)}
    files = checkpoint_files(directory)
    keys = {param_id: _checkpoint_key(owners[param_id], files, model.base_model_prefix, directory)
            for param_id in wanted}
    by_file: dict[str, list[int]] = defaultdict(list)
    for param_id, key in keys.items():
        by_file[files[key]].append(param_id)
    for filename, param_ids in by_file.items():
        with safe_open(str(directory / filename), framework="pt", device="cpu") as checkpoint:
            for param_id in param_ids:
                tensor = checkpoint.get_tensor(keys[param_id]).to(device=device, dtype=DTYPES[dtype])
                if tensor.shape != wanted[param_id].shape:
                    raise ModelLoadError(f"{directory}: {keys[param_id]} has shape {tuple(tensor.shape)}, the "
                                         f"config says {tuple(wanted[param_id].shape)}")
                loaded = nn.Parameter(tensor, requires_grad=False)
                for module, attribute, _ in owners[param_id]:  # every owner: tied weights stay tied
                    setattr(module, attribute, loaded)
    return model.eval()


def _borrowed_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """What the drafter uses (both embedding modules, bias included) and what the fingerprint hashes."""
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    params = [param for module in modules for param in module.parameters(recurse=False)]
    return params + [tensor for tensor in fingerprint_tensors(model).values() if isinstance(tensor, nn.Parameter)]


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(parameter) -> every (module, attribute, full name) holding it (tied parameters have several)."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, param in module.named_parameters(recurse=False):
            owners[id(param)].append((module, attribute, f"{module_name}.{attribute}" if module_name else attribute))
    return owners


def checkpoint_files(directory: Path) -> dict[str, str]:
    """Tensor name -> safetensors file (relative to `directory`)."""
    index = directory / SAFETENSORS_INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    if not (directory / SAFETENSORS_NAME).is_file():
        raise ModelLoadError(f"{directory}: no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")
    with safe_open(str(directory / SAFETENSORS_NAME), framework="pt", device="cpu") as checkpoint:
        return {key: SAFETENSORS_NAME for key in checkpoint.keys()}


def _checkpoint_key(owners: list[tuple[nn.Module, str, str]], files: dict[str, str], prefix: str,
                    directory: Path) -> str:
    names = [name for _, _, name in owners]
    candidates = names + [name.removeprefix(f"{prefix}.") for name in names if prefix]
    for candidate in candidates:
        if candidate in files:
            return candidate
    raise ModelLoadError(f"{directory}: the checkpoint holds none of {sorted(set(candidates))}")
