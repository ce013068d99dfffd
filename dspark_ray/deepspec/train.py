"""`dspark-ray deepspec train`: train a DSpark drafter (or the ablation, or a draft LM) on prepared data.

Every step: a batch of regenerated sequences -> the target's states (from the feature cache, or a
no-grad target forward on the fly) -> random anchor blocks -> the DSpark loss (loss.py). The same
data and target pass also distil a small Llama draft LM (`--draft-lm`) for comparison, and
`--sequential-head none` trains the parallel-only ablation. Seeded; a checkpoint (weights,
optimizer, sampler and RNG state) is written every `--checkpoint-every` steps and `--resume`
continues from it to the same weights an uninterrupted run reaches; it is removed once all steps
are done. The target defaults to the one the dataset records, and a dataset or a drafter directory
made for another target is refused; the drafter records its target (`target.json`) in turn.
`--time-budget-s` counts this run's time only (not the time before a `--resume`): the progress
bar, the LR warm-up and the decay follow whichever ends first, the steps or the budget.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dspark_ray.config import resolve_target
from dspark_ray.deepspec.blocks import SequenceBatch, SequenceSampler, sample_blocks
from dspark_ray.deepspec.command import run_reporting_errors
from dspark_ray.deepspec.feature_cache import FeatureCache
from dspark_ray.deepspec.loss import LossTerms, LossWeights, dspark_loss
from dspark_ray.deepspec.records import DATA_NAME, read_records
from dspark_ray.deepspec.target_pass import TargetBatch, TargetPass
from dspark_ray.target_record import TargetRecord, check_record, make_record, read_record, write_record

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int, time_fraction: float = 0.0) -> float:
        """Linear warmup over the first warmup_steps / steps of the run, then cosine decay to
        min_lr_ratio * lr; under a time budget both follow whichever is further along, the steps or
        the time (so a cut run still warms up and ends annealed)."""
        share = min(1.0, self.warmup_steps / max(1, self.steps))  # of the steps, or of the budget
        warm = max((step + 1) / max(1, self.warmup_steps), time_fraction / share if share else 1.0)
        if warm < 1:
            return self.lr * warm
        progress = max((step - self.warmup_steps) / max(1, self.steps - self.warmup_steps),
                       (time_fraction - share) / (1 - share) if share < 1 else 1.0)
        progress = min(1.0, max(0.0, progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class TargetSource:
    """The target's states for a batch: read from the feature cache, or computed on the fly."""

    def __init__(self, target_pass: TargetPass, cache: FeatureCache | None) -> None:
        self.target_pass, self.cache = target_pass, cache

    def __call__(self, batch: SequenceBatch) -> TargetBatch:
        if self.cache is None:
            return self.target_pass(batch.input_ids, batch.lengths)
        rows, width = batch.input_ids.shape
        loaded = [self.cache.load(record_id) for record_id in batch.record_ids]
        features = torch.zeros(rows, width, loaded[0][0].shape[-1])
        final_hidden = torch.zeros(rows, width, loaded[0][1].shape[-1])
        for row, (row_features, row_final) in enumerate(loaded):
            length = int(batch.lengths[row])
            features[row, :length], final_hidden[row, :length] = row_features[:length], row_final[:length]
        device = batch.input_ids.device
        return TargetBatch(features.to(device), final_hidden.to(device))


def dspark_step(model, source: TargetSource, batch: SequenceBatch, num_anchors: int, generator: torch.Generator,
                weights: LossWeights, answer_only: bool) -> LossTerms:
    """One teacher-forced forward of A blocks per sequence and its loss."""
    device = model.mask_embedding.device
    blocks = sample_blocks(batch, num_anchors, model.block_size, generator, answer_only).to(device)
    batch = batch.to(device)
    states = source(batch)
    rows, width = batch.input_ids.shape
    slots = torch.arange(width, device=device)
    context_kv = model.context_kv(states.features, slots.expand(rows, width))  # [B, T, layers, 2, D]
    context_mask = (slots < blocks.anchors[:, :, None]) & (slots < batch.lengths[:, None, None])  # [B, A, T]
    anchor_ids = batch.input_ids.gather(1, blocks.anchors)
    output = model(anchor_ids, blocks.anchors, context_kv, context_mask)
    draft_logits, confidence_logits = model.teacher_forced(output, blocks.prev_ids)  # [B, A, K, V], [B, A, K]
    final = states.final_hidden.gather(1, blocks.positions.flatten(1)[..., None].expand(-1, -1, states.final_hidden.shape[-1]))
    target_logits = source.target_pass.logits(final).view(*blocks.positions.shape, -1)  # [B, A, K, V]
    return dspark_loss(draft_logits.flatten(0, 1), confidence_logits.flatten(0, 1), target_logits.flatten(0, 1),
                       blocks.labels.flatten(0, 1), blocks.valid.flatten(0, 1), weights)


def draft_lm_step(draft, source: TargetSource, batch: SequenceBatch, ce_weight: float,
                  answer_only: bool) -> LossTerms:
    """KL(target || draft) + ce_weight * CE on the next tokens of the (answer) positions."""
    batch = batch.to(draft.device)
    states = source(batch)
    rows, width = batch.input_ids.shape
    slots = torch.arange(width, device=draft.device)
    attention_mask = (slots < batch.lengths[:, None]).long()
    draft_logits = draft(input_ids=batch.input_ids, attention_mask=attention_mask).logits[:, :-1]  # [B, T-1, V]
    target_logits = source.target_pass.logits(states.final_hidden[:, :-1])
    low = (batch.answer_starts - 1).clamp(min=0) if answer_only else torch.zeros_like(batch.lengths)
    mask = ((slots[:-1] >= low[:, None]) & (slots[:-1] + 1 < batch.lengths[:, None])).float()
    kl = (target_logits.softmax(-1) * (target_logits.log_softmax(-1) - draft_logits.log_softmax(-1))).sum(-1)
    ce = F.cross_entropy(draft_logits.flatten(0, 1), batch.input_ids[:, 1:].flatten(), reduction="none")
    denominator = mask.sum().clamp(min=1.0)
    kl_mean, ce_mean = (kl * mask).sum() / denominator, (ce.view_as(mask) * mask).sum() / denominator
    with torch.no_grad():
        agree = ((draft_logits.argmax(-1) == target_logits.argmax(-1)).float() * mask).sum() / denominator
    return LossTerms(kl_mean + ce_weight * ce_mean, ce_mean.item(), kl_mean.item(), 0.0, [agree.item()], 0.0)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a DSpark drafter, the parallel-only ablation or a draft LM",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="directory written by `deepspec prepare`")
    parser.add_argument("--out", type=Path, required=True, help="output drafter directory (checkpoint inside)")
    parser.add_argument("--target", type=Path, default=None,
                        help="target HF directory (default: the one the dataset records, else the bundled one)")
    parser.add_argument("--draft-lm", action="store_true", help="distil a small Llama draft LM instead")
    shape = parser.add_argument_group("DSpark drafter shape")
    shape.add_argument("--sequential-head", choices=["none", "vanilla", "gated", "rnn"], default="vanilla",
                       help="'none' is the parallel-only ablation")
    shape.add_argument("--block-size", type=int, default=8)
    shape.add_argument("--hidden-size", type=int, default=None, help="backbone width (default: the target's)")
    shape.add_argument("--num-layers", type=int, default=2)
    shape.add_argument("--num-heads", type=int, default=4)
    shape.add_argument("--intermediate-size", type=int, default=None, help="default: 2 x hidden size")
    shape.add_argument("--head-rank", type=int, default=128)
    shape.add_argument("--target-layer-ids", default=None, help="comma-separated (default: 3 spread layers)")
    lm = parser.add_argument_group("draft LM shape (--draft-lm)")
    lm.add_argument("--draft-hidden-size", type=int, default=192)
    lm.add_argument("--draft-layers", type=int, default=3)
    lm.add_argument("--draft-heads", type=int, default=6)
    lm.add_argument("--draft-intermediate-size", type=int, default=512)
    lm.add_argument("--draft-ce-weight", type=float, default=0.1, help="CE weight next to the KL term")
    loss = parser.add_argument_group("DSpark loss")
    loss.add_argument("--w-ce", type=float, default=0.1)
    loss.add_argument("--w-tv", type=float, default=0.9)
    loss.add_argument("--w-conf", type=float, default=1.0)
    loss.add_argument("--position-decay", type=float, default=None, help="gamma of exp(-k/gamma) weights")
    loss.add_argument("--confidence-target", choices=["greedy", "soft"], default="greedy")
    loss.add_argument("--anchors", type=int, default=32, help="blocks per sequence per step")
    parser.add_argument("--all-positions", action="store_true", help="anchors in the prompt too, not only answers")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=500)
    opt.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    opt.add_argument("--max-len", type=int, default=1024, help="sequences are cut to this many tokens")
    opt.add_argument("--lr", type=float, default=2e-3)
    opt.add_argument("--warmup-steps", type=int, default=30)
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--features", choices=["auto", "cache", "online"], default="auto",
                        help="target states from the cache written by prepare, or computed on the fly "
                             "(auto: the cache if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="end training (and save the drafter) once this run has spent this much wall-clock "
                             "time (time before a --resume does not count)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop once this many steps are done (checkpointed), e.g. to train in time slices")
    parser.add_argument("--storage-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the saved weights (bfloat16 halves the size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device of the target and the drafter, e.g. cuda")
    parser.set_defaults(func=run, dspark_only=_dests(shape, loss), draft_lm_only=_dests(lm))


def _dests(*groups) -> tuple[str, ...]:
    """The options of these argument groups (the model card leaves out those a run does not read)."""
    return tuple(action.dest for group in groups for action in group._group_actions)


def build_model(args: argparse.Namespace, target):
    """A freshly initialised drafter (the caller has seeded torch)."""
    if args.draft_lm:
        from transformers import LlamaConfig, LlamaForCausalLM

        vocab_size = target.get_output_embeddings().weight.shape[0]
        eos = target.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.draft_hidden_size,
                             intermediate_size=args.draft_intermediate_size, num_hidden_layers=args.draft_layers,
                             num_attention_heads=args.draft_heads, num_key_value_heads=args.draft_heads,
                             max_position_embeddings=getattr(target.config, "max_position_embeddings", 2048),
                             tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        return LlamaForCausalLM(config)
    from dspark_ray.deepspec.prepare import parse_layer_ids
    from dspark_ray.dspark.config import DSparkConfig, spread_layer_ids
    from dspark_ray.dspark.io import new_dspark_model
    from dspark_ray.dspark.signature import target_signature

    signature = target_signature(target)
    hidden = args.hidden_size or signature.hidden_size
    config = DSparkConfig(
        target=signature,
        target_layer_ids=parse_layer_ids(args.target_layer_ids) or spread_layer_ids(signature.num_layers),
        block_size=args.block_size, hidden_size=hidden, num_layers=args.num_layers, num_heads=args.num_heads,
        intermediate_size=args.intermediate_size or 2 * hidden, sequential_head=args.sequential_head,
        head_rank=args.head_rank)
    return new_dspark_model(config, target)


def layer_ids_of(model, args: argparse.Namespace, target) -> list[int]:
    if not args.draft_lm:
        return list(model.config.target_layer_ids)
    from dspark_ray.dspark.config import spread_layer_ids
    from dspark_ray.engine.feature_capture import decoder_layers
    return list(spread_layer_ids(len(decoder_layers(target))))  # unused by the loss; matches a cache


def make_source(args: argparse.Namespace, data: Path, target, layer_ids: list[int]) -> TargetSource:
    cache = FeatureCache(data)
    use_cache = args.features == "cache" or (args.features == "auto" and cache.exists())
    if args.features == "cache" and not cache.exists():
        raise ValueError(f"no feature cache in {data} (run prepare with --cache-features)")
    if use_cache:
        cache.check_layers(layer_ids)
    return TargetSource(TargetPass(target, layer_ids), cache if use_cache else None)


def save_checkpoint(path: Path, model, optimizer, step: int, generator: torch.Generator,
                    sampler: SequenceSampler, elapsed_s: float) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "sampler": sampler.state(), "elapsed_s": elapsed_s}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def make_optimizer(model, args: argparse.Namespace) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), foreach=False)


@dataclass
class TrainOutcome:
    steps: int
    elapsed_s: float
    final: dict
    num_records: int
    num_tokens: int


def claim_output(args: argparse.Namespace, record: TargetRecord) -> None:
    """Refuse to resume into a drafter of another target; record this run's target in `out`."""
    if args.resume and read_record(args.out) is not None:
        check_record(args.out, args.target, "the drafter being resumed", record.weights_fingerprint)
    write_record(args.out, record)


def progress_bar(args: argparse.Namespace, step: int) -> tqdm:
    """Steps, or under a time budget this run's seconds of it (whichever ends the run, the bar and
    its ETA show the budget; the step count goes in the postfix)."""
    desc = "draft LM" if args.draft_lm else f"dspark[{args.sequential_head}]"
    if args.time_budget_s is None:
        return tqdm(total=args.steps, initial=step, desc=desc, unit="step", mininterval=2.0, dynamic_ncols=True)
    return tqdm(total=round(args.time_budget_s), desc=f"{desc} budget", unit="s", mininterval=2.0, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]")


def train(args: argparse.Namespace) -> TrainOutcome:
    from dspark_ray.dspark.signature import target_fingerprint
    from dspark_ray.engine.loading import load_causal_lm

    torch.manual_seed(args.seed)
    args.target = resolve_target(args.target, [args.data])
    target = load_causal_lm(args.target, device=args.device).requires_grad_(False)
    record = make_record(args.target, target_fingerprint(target))
    check_record(args.data, args.target, "the dataset", record.weights_fingerprint)
    model = build_model(args, target).to(args.device)
    records = read_records(args.data / DATA_NAME)
    source = make_source(args, args.data, target, layer_ids_of(model, args, target))
    generator = torch.Generator().manual_seed(args.seed)
    sampler = SequenceSampler(records, args.batch_size, args.max_len, generator)
    optimizer = make_optimizer(model, args)
    schedule = Schedule(args.steps, args.lr, args.warmup_steps)
    weights = LossWeights(args.w_ce, args.w_tv, args.w_conf, args.position_decay, args.confidence_target)
    args.out.mkdir(parents=True, exist_ok=True)
    claim_output(args, record)
    checkpoint = args.out / CHECKPOINT_NAME
    step, elapsed = 0, 0.0  # elapsed: training time of earlier runs (reported, not budgeted)
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False, map_location=args.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        sampler.load_state(state["sampler"])
        step, elapsed = state["step"], state["elapsed_s"]
        print(f"resumed from {checkpoint} at step {step}")
    model.train()
    final: dict = {}
    tokens_seen, started = 0, time.perf_counter()
    bar = progress_bar(args, step)
    done = step
    for step in range(step, args.steps):
        done = step + 1
        spent = time.perf_counter() - started  # this run's time: the budget's
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step, spent / args.time_budget_s if args.time_budget_s else 0.0)
        batch = sampler.next_batch()
        if args.draft_lm:
            terms = draft_lm_step(model, source, batch, args.draft_ce_weight, not args.all_positions)
        else:
            terms = dspark_step(model, source, batch, args.anchors, generator, weights, not args.all_positions)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(batch.lengths.sum())
        spent = time.perf_counter() - started
        final = {"loss": terms.total.item(), "ce": terms.ce, "tv_or_kl": terms.tv, "confidence_bce": terms.confidence,
                 "acceptance_length_teacher_forced": terms.acceptance_length,
                 "acceptance_rate_per_position": [round(x, 4) for x in terms.acceptance_rate]}
        bar.update(1 if args.time_budget_s is None else min(bar.total, round(spent)) - bar.n)
        bar.set_postfix(step=f"{step + 1}/{args.steps}", loss=f"{terms.total.item():.3f}",
                        acc_len=f"{terms.acceptance_length:.2f}", tok_s=f"{tokens_seen / spent:.0f}", refresh=False)
        stopping = args.stop_after is not None and step + 1 >= args.stop_after
        over_budget = args.time_budget_s is not None and spent > args.time_budget_s
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps or stopping or over_budget:
            save_checkpoint(checkpoint, model, optimizer, step + 1, generator, sampler, elapsed + spent)
        if stopping and step + 1 < args.steps:
            bar.close()
            return TrainOutcome(step + 1, elapsed + spent, final, len(records), 0)
        if over_budget:
            print(f"time budget reached after {step + 1} of {args.steps} steps; the drafter is saved, --resume "
                  f"continues from {checkpoint}")
            break
    bar.close()
    elapsed += time.perf_counter() - started
    model.eval()
    num_tokens = sum(len(record.token_ids) for record in records)
    outcome = TrainOutcome(done, elapsed, final, len(records), num_tokens)
    save_output(args, model, outcome, record)
    if done == args.steps:
        checkpoint.unlink(missing_ok=True)  # finished: the drafter is what is left
    return outcome


def command_line(args: argparse.Namespace) -> str:
    """The command (every option this kind of run reads, defaults included) that reproduces this run."""
    unused = args.dspark_only if args.draft_lm else args.draft_lm_only
    skipped = {"func", "command", "deepspec_command", "resume", "stop_after", "dspark_only", "draft_lm_only", *unused}
    parts = ["dspark-ray", "deepspec", "train"]
    for key, value in vars(args).items():
        if key in skipped or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(part) for part in parts)


def readable_like_the_rest(directory: Path) -> None:
    """Give every file the mode the umask gives new files (safetensors writes its own 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def save_output(args: argparse.Namespace, model, outcome: TrainOutcome, record: TargetRecord) -> None:
    from dspark_ray.deepspec.model_card import training_card

    card = training_card(args, model, outcome, command_line(args), record)
    dtype = torch.bfloat16 if args.storage_dtype == "bfloat16" else torch.float32
    if args.draft_lm:
        from dspark_ray.engine.loading import load_tokenizer

        stored = model.to(dtype)
        stored.save_pretrained(str(args.out), safe_serialization=True)
        model.float()
        load_tokenizer(args.target).save_pretrained(str(args.out))
        (args.out / "README.md").write_text(card)
    else:
        from dspark_ray.dspark.io import save_dspark
        save_dspark(model, args.out, card, dtype)
    readable_like_the_rest(args.out)


def run(args: argparse.Namespace) -> int:
    outcome = run_reporting_errors("train", args, lambda: train(args))
    if outcome is None:
        return 2
    if outcome.steps < args.steps and not (args.out / "model.safetensors").is_file():
        print(f"stopped after {outcome.steps} of {args.steps} steps; continue with --resume")
        return 0
    print(f"trained {outcome.steps} steps in {outcome.elapsed_s:.0f} s -> {args.out}")
    print({key: value for key, value in asdict(outcome).items() if key != "final"} | outcome.final)
    return 0
