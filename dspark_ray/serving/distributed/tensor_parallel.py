"""Tensor parallelism for the target: the process group, sharded loading, per-rank parameter bytes.

Sharding follows gpt-fast: the model is built first and sharded afterwards, so model code never
mentions TP. `tp_sharding="auto"` uses transformers' own plans (`distributed_config`) where the
architecture has one (Llama, Qwen3-MoE, DeepSeek-V3, ...: attention heads and MLP intermediate
dimensions split across ranks, routed experts split by the expert-parallel plan where the model
has one); `"manual"` (and any model without a plan) uses this
module's sharding: every MLP (gate/up column-wise, down row-wise) and every fused expert bank
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) split along the intermediate dimension, with an
all-reduce after each, attention replicated.

It knows nothing about sequences, gRPC or Ray.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from dspark_ray.config import EngineConfig
from dspark_ray.engine.loading import DTYPES, load_causal_lm

Sharding = Literal["auto", "manual"]
CONTROL_TIMEOUT = timedelta(days=365)  # "never" for the command channel of an idle group


@dataclass(frozen=True)
class RankEnvironment:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def export(self) -> None:
        """The torchrun-style variables that torch.distributed and transformers read."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


@dataclass(frozen=True)
class ParameterBytes:
    total: int
    experts: int  # parameters of routed-expert banks (".experts." in the name)


def open_rendezvous(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a port the OS picks as it binds (`.port`). Asking for
    a free port first and binding it later races with every other socket on the machine."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def init_group(env: RankEnvironment, backend: str, timeout_s: float,
               store: dist.TCPStore | None = None) -> dist.ProcessGroup:
    """Join the group through rank 0's rendezvous `store` (the other ranks pass None and dial it);
    its collectives time out after `timeout_s`. Returns the gloo group that carries commands, whose
    waits do not time out: a follower rank waits there for the next command however long the
    replica idles (a dead rank 0 still ends the wait: its connections close)."""
    env.export()
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout, store=store)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def check_group(device: str) -> str:
    """All-reduce one value through the group (on the model's device); returns the backend used."""
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if int(probe.item()) != dist.get_world_size():
        raise RuntimeError(f"all-reduce over the {dist.get_backend()} group gave {probe.item()}")
    return str(dist.get_backend())


def load_target_shard(config: EngineConfig, world_size: int, sharding: Sharding) -> PreTrainedModel:
    if world_size == 1:
        return load_causal_lm(config.target, config.dtype, config.device)
    model_config = AutoConfig.from_pretrained(config.target, local_files_only=True)
    if sharding == "auto" and getattr(model_config, "base_model_tp_plan", None):
        model = AutoModelForCausalLM.from_pretrained(config.target, dtype=DTYPES[config.dtype], local_files_only=True,
                                                     distributed_config=auto_distributed_config(model_config, world_size))
        return model.eval()
    model = load_causal_lm(config.target, config.dtype, config.device)
    shard_manually(model, dist.get_rank(), world_size)
    return model


def auto_distributed_config(model_config, world_size: int):
    """transformers' own plans over `world_size` ranks: its TP plan, and its expert-parallel plan for
    MoE models that have one (from transformers 5.25 the routed experts are in the EP plan only, so a
    TP plan alone leaves every expert whole on every rank)."""
    from transformers.distributed import DistributedConfig

    fields = {field.name for field in dataclasses.fields(DistributedConfig)}
    if getattr(model_config, "base_model_ep_plan", None) and "ep_size" in fields:
        return DistributedConfig(tp_size=world_size, ep_size=world_size)
    return DistributedConfig(tp_size=world_size)


def shard_manually(model: nn.Module, rank: int, world_size: int) -> None:
    """Split MLPs and fused expert banks along their intermediate dimension; all-reduce their outputs."""
    num_sharded = 0
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in ("gate_proj", "up_proj"):
            _keep(module, "weight", 0, rank, world_size)
            if module.bias is not None:
                _keep(module, "bias", 0, rank, world_size)
        elif isinstance(module, nn.Linear) and leaf == "down_proj":
            _keep(module, "weight", 1, rank, world_size)
            if module.bias is not None and rank != 0:  # added once, after the all-reduce sums the parts
                module.bias.data.zero_()
            module.register_forward_hook(_all_reduce_output)
            num_sharded += 1
        elif _is_expert_bank(module):
            gate, up = module.gate_up_proj.data.chunk(2, dim=1)  # [E, I, H] each
            module.gate_up_proj.data = torch.cat([_part(gate, 1, rank, world_size),
                                                  _part(up, 1, rank, world_size)], dim=1).contiguous()
            _keep(module, "down_proj", 2, rank, world_size)
            module.register_forward_hook(_all_reduce_output)
            num_sharded += 1
    if num_sharded == 0:
        raise ValueError(f"{type(model).__name__}: found no MLP or expert bank to shard")


def parameter_bytes(model: nn.Module) -> ParameterBytes:
    """Bytes this rank really holds (the local shard of distributed tensors)."""
    total = experts = 0
    for name, param in model.named_parameters():
        local = param.data.to_local() if hasattr(param.data, "to_local") else param.data
        size = local.numel() * local.element_size()
        total += size
        experts += size if ".experts." in f".{name}" else 0
    return ParameterBytes(total, experts)


def _is_expert_bank(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and getattr(module, "gate_up_proj_bias", None) is None)


def _keep(module: nn.Module, attribute: str, dim: int, rank: int, world_size: int) -> None:
    param = getattr(module, attribute)
    param.data = _part(param.data, dim, rank, world_size).contiguous()


def _part(tensor: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    if tensor.shape[dim] % world_size:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} does not split into {world_size} ranks")
    return tensor.chunk(world_size, dim=dim)[rank]


def _all_reduce_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output
