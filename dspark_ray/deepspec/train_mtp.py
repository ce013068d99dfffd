"""`dspark-ray deepspec train-mtp`: train a DeepSeek-V3-style MTP layer for a target that ships none.

The layer is transformers' `MtpModel` for the target (enorm, hnorm, eh_proj, a block of the
target's last-layer class, post_norm = `shared_head.norm`; the target's embeddings and lm_head,
frozen). On sequences the target regenerated (`deepspec prepare`) it learns what drafter 'mtp'
asks of it: at entry i, from the target's lm_head input h_i and the embedding of t_{i+1}, the
target's own distribution over t_{i+2} (KL to it, plus `--ce-weight` x cross-entropy on t_{i+2}),
all entries of a sequence in one causal forward. The block starts as a copy of the target's last
decoder layer, post_norm as its final norm, eh_proj as hnorm(h) passed through (plus a small random
embedding part).

Written to `<out>/model.safetensors` as decoder layer `num_hidden_layers` in the checkpoint's own
layout (DeepSeek-V3: per-expert weights, split back from transformers' fused experts), so
`--drafter mtp --draft <out>` reads it as it reads a layer shipped with the target. DeepSeek-V3
targets only (the layout is V3's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from dspark_ray.config import resolve_target
from dspark_ray.deepspec.blocks import SequenceBatch, SequenceSampler
from dspark_ray.deepspec.command import run_reporting_errors
from dspark_ray.deepspec.records import DATA_NAME, read_records
from dspark_ray.deepspec.target_pass import TargetPass
from dspark_ray.deepspec.train import Schedule, make_optimizer

EH_PROJ_EMBEDDING_STD = 0.02


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train-mtp", help="train an MTP layer (drafter 'mtp') for a DeepSeek-V3 target",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="directory written by `deepspec prepare`")
    parser.add_argument("--out", type=Path, required=True, help="output directory (model.safetensors)")
    parser.add_argument("--target", type=Path, default=None,
                        help="target HF directory (default: the one the dataset records, else the bundled one)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--max-len", type=int, default=512, help="sequences are cut to this many tokens")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.1, help="cross-entropy weight next to the KL term")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop (annealed: the lr schedule follows the time too) and save after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.set_defaults(func=run)


def initial_mtp(target):
    """transformers' MTP module for `target`, started from the target's last layer (module docstring)."""
    from transformers.modeling_layers import MtpModel

    mtp = MtpModel(target, 1)
    layer = mtp.layers[0]
    layer.mtp_block.load_state_dict(target.get_decoder().layers[-1].state_dict())
    layer.post_norm.load_state_dict(target.get_decoder().norm.state_dict())
    hidden = target.config.hidden_size
    with torch.no_grad():
        layer.eh_proj.weight[:, :hidden].normal_(0.0, EH_PROJ_EMBEDDING_STD)
        layer.eh_proj.weight[:, hidden:].copy_(torch.eye(hidden))
    mtp.rotary_emb = None  # the target's, not a part of the layer
    return mtp


def mtp_step(mtp, rotary, target_pass: TargetPass, batch: SequenceBatch, ce_weight: float
             ) -> tuple[torch.Tensor, float]:
    """Loss of every entry of the batch's answers, and the fraction whose argmax is the target's."""
    final_hidden = target_pass(batch.input_ids, batch.lengths).final_hidden  # [B, T, E]: h_i
    rows, width = batch.input_ids.shape
    slots = torch.arange(width - 1)
    embeds = mtp.embed_tokens(batch.input_ids[:, 1:])  # [B, T-1, E]: t_{i+1}
    entries = slots[None, :] < (batch.lengths - 1)[:, None]  # [B, T-1]
    allowed = entries[:, None, :] & (slots[None, :] <= slots[:, None])[None]  # [B, T-1, T-1]
    allowed |= torch.eye(width - 1, dtype=torch.bool)[None]  # every query sees itself (no NaN at padding)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    positions = slots[None].expand(rows, -1)
    output = mtp.layers[0](embeds, final_hidden[:, :-1], position_embeddings=rotary(embeds, positions),
                           attention_mask=mask, position_ids=positions, cache=None)  # [B, T-1, E]
    draft_logits = mtp.shared_head(output)[:, :-1].float()  # [B, T-2, V]: entry i predicts t_{i+2}
    target_logits = target_pass.logits(final_hidden[:, 1:-1])  # [B, T-2, V]: the target at i+1
    first = (batch.answer_starts - 2).clamp(min=0)  # entries that predict answer tokens
    scored = ((slots[:-1] >= first[:, None]) & (slots[:-1] + 2 < batch.lengths[:, None])).float()  # [B, T-2]
    kl = (target_logits.softmax(-1) * (target_logits.log_softmax(-1) - draft_logits.log_softmax(-1))).sum(-1)
    ce = F.cross_entropy(draft_logits.flatten(0, 1), batch.input_ids[:, 2:].flatten(), reduction="none")
    count = scored.sum().clamp(min=1.0)
    loss = (kl * scored).sum() / count + ce_weight * (ce.view_as(scored) * scored).sum() / count
    agree = ((draft_logits.argmax(-1) == target_logits.argmax(-1)).float() * scored).sum() / count
    return loss, agree.item()


def checkpoint_tensors(mtp, layer_index: int) -> dict[str, torch.Tensor]:
    """The layer's tensors under DeepSeek-V3's checkpoint names (`model.layers.{layer_index}.*`)."""
    prefix, tensors = f"model.layers.{layer_index}.", {}
    for name, tensor in mtp.layers[0].state_dict().items():
        name = name.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(len(tensor)):
                tensors[f"{prefix}mlp.experts.{expert}.gate_proj.weight"] = gate[expert]
                tensors[f"{prefix}mlp.experts.{expert}.up_proj.weight"] = up[expert]
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for expert in range(len(tensor)):
                tensors[f"{prefix}mlp.experts.{expert}.down_proj.weight"] = tensor[expert]
        else:
            tensors[prefix + name] = tensor
    return {name: tensor.detach().contiguous() for name, tensor in tensors.items()}


def train(args: argparse.Namespace) -> dict:
    from dspark_ray.engine.loading import ModelLoadError, load_causal_lm

    from dspark_ray.dspark.signature import target_fingerprint
    from dspark_ray.target_record import check_record

    torch.manual_seed(args.seed)
    args.target = resolve_target(args.target, [args.data])
    target = load_causal_lm(args.target).requires_grad_(False)
    check_record(args.data, args.target, "the dataset", target_fingerprint(target))
    if target.config.model_type != "deepseek_v3":
        raise ModelLoadError(f"{args.target}: train-mtp writes DeepSeek-V3's MTP layout, "
                             f"not {target.config.model_type}'s")
    mtp = initial_mtp(target)
    rotary = type(target.get_decoder().rotary_emb)(config=target.config)
    target_pass = TargetPass(target, [target.config.num_hidden_layers - 1])
    generator = torch.Generator().manual_seed(args.seed)
    sampler = SequenceSampler(read_records(args.data / DATA_NAME), args.batch_size, args.max_len, generator)
    trained = torch.nn.ModuleList([mtp.layers[0]])
    optimizer = make_optimizer(trained, args)
    schedule = Schedule(args.steps, args.lr, args.warmup_steps)
    started, recent, budget, done = time.perf_counter(), [], args.time_budget_s, 0
    for step in tqdm(range(args.steps), desc="mtp", mininterval=2.0, dynamic_ncols=True):
        spent = time.perf_counter() - started
        if budget is not None and spent > budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step, spent / budget if budget else 0.0)
        loss, agree = mtp_step(mtp, rotary, target_pass, sampler.next_batch(), args.ce_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [(loss.item(), agree)])[-20:]
        done = step + 1
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(mtp, target.config.num_hidden_layers), args.out / "model.safetensors",
              metadata={"format": "pt"})
    return {"steps": done, "elapsed_s": round(time.perf_counter() - started, 1),
            "loss_last_20": round(sum(x for x, _ in recent) / len(recent), 4),
            "argmax_agreement_last_20": round(sum(y for _, y in recent) / len(recent), 4)}


def run(args: argparse.Namespace) -> int:
    summary = run_reporting_errors("train-mtp", args, lambda: train(args))
    if summary is None:
        return 2
    print(f"-> {args.out / 'model.safetensors'} {summary}")
    return 0
