"""README.md model cards for drafters trained by `deepspec train`: what, for which target, how, how long."""

from __future__ import annotations

import argparse
import json

import torch


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _features_source(features: str) -> str:
    return {"cache": "from the on-disk cache", "online": "computed on the fly"}.get(
        features, "from the on-disk cache if present, else computed on the fly")


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


def training_card(args: argparse.Namespace, model, outcome, command: str, record) -> str:
    if args.draft_lm:
        title, what = "Distilled draft LM", (
            "A small dense Llama LM distilled (KL to the target's distribution + CE) from the same "
            "regenerated data as the DSpark drafters, for comparison (`--drafter model`).")
        shape = json.dumps({k: getattr(model.config, k) for k in
                            ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")})
    else:
        config = model.config
        kind = "parallel-only ablation (no sequential head)" if config.sequential_head == "none" else \
            f"`{config.sequential_head}` sequential head"
        title, what = "DSpark drafter", (
            f"A DSpark drafter ({kind}): a {config.num_layers}-layer parallel backbone conditioned on target "
            f"layers {list(config.target_layer_ids)}, drafting blocks of {config.block_size} tokens in one "
            "forward, plus a confidence head. It borrows the target's token embeddings and lm_head "
            "(not stored here), so it loads only against the target it was trained for "
            f"(`{config.target.architecture}`, fingerprint `{config.target.fingerprint[:16]}...`).")
        shape = config.model_dump_json(exclude={"target"})
    final = json.dumps(outcome.final)
    return f"""# {title}

{what}

- Target: `{args.target}`, tokenizer fingerprint `{record.tokenizer_fingerprint[:16]}...` (recorded in
  `target.json`; commands refuse this drafter for another target)
- Parameters (own, excluding the target's borrowed embeddings/lm_head): {_num_params(model):,}
- Shape: `{shape}`
- Saved weights dtype: {args.storage_dtype}

## Training

- Command: `{command}`
- Data: `{args.data}` ({outcome.num_records} regenerated sequences, {outcome.num_tokens} tokens); target states
  {_features_source(args.features)}
- Steps: {outcome.steps} x {args.batch_size} sequences{"" if args.draft_lm else f" x {args.anchors} anchor blocks"},
  lr {args.lr}, seed {args.seed}; loss weights ce/tv/conf = {args.w_ce}/{args.w_tv}/{args.w_conf}
- Wall-clock training time: {outcome.elapsed_s:.0f} s on {_device_name(args.device)}
- Last step: `{final}`
"""
