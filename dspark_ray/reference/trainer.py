"""A small, seeded CPU training loop shared by the target and the draft recipes.

AdamW with linear warmup then cosine decay to `min_lr_ratio` of the peak learning rate; a tqdm
bar shows the running loss and tokens per second. The loss is supplied by the caller, so the same
loop trains the target (next-token cross-entropy) and distils the draft (KL to the target).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dspark_ray.reference.data import WindowSampler

LossFn = Callable[[torch.Tensor], torch.Tensor]  # batch [B, S + 1] -> scalar loss


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float


def seed_everything(seed: int, threads: int) -> None:
    """Fix every RNG and the thread count; ask torch for deterministic kernels."""
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=False)


def train(
    model: torch.nn.Module,
    sampler: WindowSampler,
    loss_fn: LossFn,
    config: TrainConfig,
    desc: str,
) -> TrainResult:
    """Run `config.steps` optimizer steps of `loss_fn` over batches from `sampler`."""
    model.train()
    optimizer = make_optimizer(model, config)
    tokens_per_step = config.batch_size * config.seq_len
    device = next(model.parameters()).device
    start, smoothed = time.perf_counter(), float("nan")
    bar = tqdm(range(config.steps), desc=desc, mininterval=5.0, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = loss_fn(sampler.next_batch().to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
        rate = (step + 1) * tokens_per_step / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{rate:.0f}", refresh=False)
    model.eval()
    seconds = time.perf_counter() - start
    return TrainResult(config.steps, config.steps * tokens_per_step, seconds, smoothed)
