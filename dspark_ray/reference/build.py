"""`dspark-ray build-reference`: rebuild the bundled reference target, draft and prompts.

Steps: tokenizer -> target -> draft -> model cards -> held-out prompts. Each model is saved,
then reloaded from disk (float32 from the bfloat16 files) before it is evaluated or distilled
from, so a resumed build (`--reuse-target`) follows exactly the same path as a full one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_ray.dspark.signature import target_fingerprint
from dspark_ray.reference import corpus, data, distill_draft, model_card, prompts, train_target
from dspark_ray.reference.export import save_model_dir
from dspark_ray.reference.evaluate import heldout_loss, top1_agreement
from dspark_ray.reference.tokenizer import build_tokenizer
from dspark_ray.reference.trainer import TrainConfig, seed_everything
from dspark_ray.target_record import make_record, write_record

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "reference"
SEQ_LEN, BATCH_SIZE, EVAL_TOKENS = 256, 16, 32768
TARGET_STEPS, DRAFT_STEPS = 800, 500


@dataclasses.dataclass(frozen=True)
class Recipe:
    target_shape: train_target.TargetShape
    draft_shape: distill_draft.DraftShape
    target_train: TrainConfig
    draft_train: TrainConfig
    eval_tokens: int
    ce_weight: float = 0.0


def make_recipe(args: argparse.Namespace) -> Recipe:
    """The full recipe, or a tiny one for `--smoke` (seconds, for tests)."""
    if args.smoke:
        tiny = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1)
        target_train = dataclasses.replace(tiny, steps=args.target_steps or 3)
        draft_train = dataclasses.replace(tiny, steps=args.draft_steps or 3)
        return Recipe(train_target.SMOKE_SHAPE, distill_draft.SMOKE_SHAPE, target_train,
                      draft_train, eval_tokens=128)  # fmt: skip
    target_steps, draft_steps = args.target_steps or TARGET_STEPS, args.draft_steps or DRAFT_STEPS
    target_train = TrainConfig(target_steps, BATCH_SIZE, SEQ_LEN, lr=1.5e-3, warmup_steps=50)
    draft_train = TrainConfig(draft_steps, BATCH_SIZE, SEQ_LEN, lr=3e-3, warmup_steps=30)
    return Recipe(train_target.TargetShape(), _draft_shape(args), target_train,
                  draft_train, eval_tokens=EVAL_TOKENS, ce_weight=args.ce_weight)  # fmt: skip


def _draft_shape(args: argparse.Namespace) -> distill_draft.DraftShape:
    overrides = {
        "hidden_size": args.draft_hidden, "num_layers": args.draft_layers,
        "num_heads": args.draft_heads, "intermediate_size": args.draft_intermediate,
    }  # fmt: skip
    set_overrides = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(distill_draft.DraftShape(), **set_overrides)


def _train_metrics(result, config: TrainConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(config), **dataclasses.asdict(result)}


def _load(model_dir: Path, device: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device).eval()


def _sampler(train_windows: torch.Tensor, config: TrainConfig, seed: int) -> data.WindowSampler:
    return data.WindowSampler(data.windows(train_windows, config.seq_len), config.batch_size, seed)


def build_target(out: Path, recipe: Recipe, tokenizer, stream, eval_windows, seed: int,
                 device: str) -> dict:  # fmt: skip
    """Train the target, save it to `<out>/target`, reload it and measure its held-out loss."""
    seed_everything(seed, torch.get_num_threads())
    config = train_target.target_config(recipe.target_shape, len(tokenizer), tokenizer.eos_token_id)
    sampler = _sampler(stream, recipe.target_train, seed)
    model, result = train_target.train_target(config, sampler, recipe.target_train, device)
    save_model_dir(model, tokenizer, out / "target")
    total, active = train_target.parameter_counts(model)
    return {
        "architecture": f"`DeepseekV3Config` {json.dumps(dataclasses.asdict(recipe.target_shape))}",
        "total_params": total, "active_params": active,
        "experts_per_token": config.num_experts_per_tok, "routed_experts": config.n_routed_experts,
        "train": _train_metrics(result, recipe.target_train),
        "heldout_loss": heldout_loss(_load(out / "target", device), eval_windows),
    }  # fmt: skip


def build_draft(out: Path, recipe: Recipe, tokenizer, stream, eval_windows, seed: int,
                device: str) -> dict:  # fmt: skip
    """Distil the draft from the saved target, save it to `<out>/draft` and evaluate it."""
    target = _load(out / "target", device)
    seed_everything(seed + 1, torch.get_num_threads())
    config = distill_draft.draft_config(recipe.draft_shape, len(tokenizer), tokenizer.eos_token_id)
    sampler = _sampler(stream, recipe.draft_train, seed + 1)
    model, result = distill_draft.distill_draft(
        config, target, sampler, recipe.draft_train, recipe.ce_weight, device
    )
    save_model_dir(model, tokenizer, out / "draft")
    write_record(out / "draft", make_record(out / "target", target_fingerprint(target)))
    draft = _load(out / "draft", device)
    return {
        "architecture": f"`LlamaConfig` {json.dumps(dataclasses.asdict(recipe.draft_shape))}",
        "total_params": sum(p.numel() for p in model.parameters()),
        "ce_weight": recipe.ce_weight,
        "train": _train_metrics(result, recipe.draft_train),
        "heldout_loss": heldout_loss(draft, eval_windows),
        "agreement": top1_agreement(draft, target, eval_windows),
    }  # fmt: skip


def _tokenizer(out: Path, reuse: bool):
    if reuse:
        return AutoTokenizer.from_pretrained(str(out / "target"))
    texts = (text for _, text in corpus.iter_texts("train"))
    with tempfile.TemporaryDirectory() as scratch:
        return build_tokenizer(texts, Path(scratch))


def _data_metrics(tokenizer, stream: torch.Tensor) -> dict[str, Any]:
    train_files, heldout_files = corpus.split_files()
    return {
        "stdlib": corpus.stdlib_version(), "vocab_size": len(tokenizer),
        "train_files": len(train_files), "heldout_files": len(heldout_files),
        "train_tokens": int(stream.numel()),
        "heldout_tokens": int(data.token_stream(tokenizer, "heldout").numel()),
    }  # fmt: skip


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Run every step into `args.out`; return the metrics (also written to metrics.json)."""
    start, out = time.perf_counter(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    recipe = make_recipe(args)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if args.reuse_target else {}
    tokenizer = _tokenizer(out, args.reuse_target)
    stream = data.token_stream(tokenizer, "train")
    eval_windows = data.heldout_windows(tokenizer, recipe.target_train.seq_len, recipe.eval_tokens)
    eval_tokens = int(eval_windows[:, 1:].numel())
    metrics.update(seed=args.seed, threads=args.threads, device=args.device)
    metrics["eval_tokens"] = eval_tokens
    metrics["data"] = _data_metrics(tokenizer, stream)
    metrics["machine"] = _machine(args.device, args.threads)
    if not args.reuse_target:
        metrics["target"] = build_target(
            out, recipe, tokenizer, stream, eval_windows, args.seed, args.device
        )
        metrics["target_build_seconds"] = time.perf_counter() - start
        _write_json(metrics_path, metrics)
    if args.stop_after == "target":
        return metrics
    metrics["draft"] = build_draft(
        out, recipe, tokenizer, stream, eval_windows, args.seed, args.device
    )
    metrics["num_prompts"] = prompts.write_prompts(out / "prompts" / "heldout.jsonl")
    metrics["build_seconds"] = metrics.get("target_build_seconds", 0.0) + (
        time.perf_counter() - start
    )
    model_card.write_cards(out, metrics)
    _write_json(metrics_path, metrics)
    return metrics


def _machine(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} GPU (torch {torch.__version__})"
    return f"CPU, {threads} threads (torch {torch.__version__})"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    metrics = build(args)
    print(json.dumps({k: metrics[k] for k in ("target", "draft") if k in metrics}, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build-reference", help="Rebuild the bundled reference target and draft models (CPU)."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-steps", type=int, default=None, help=f"default {TARGET_STEPS}")
    parser.add_argument("--draft-steps", type=int, default=None, help=f"default {DRAFT_STEPS}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--ce-weight", type=float, default=0.0, help="draft CE weight")
    parser.add_argument("--device", default="cpu", help="torch device to train on")
    for name in ("hidden", "layers", "heads", "intermediate"):
        parser.add_argument(f"--draft-{name}", type=int, default=None, help="draft shape override")
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds (tests)")
    parser.add_argument("--reuse-target", action="store_true",
                        help="keep <out>/target and its metrics; rebuild the draft onwards")  # fmt: skip
    parser.add_argument("--stop-after", choices=("target",), default=None)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m dspark_ray.reference.build [flags]`."""
    parser = argparse.ArgumentParser(prog="dspark-ray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build-reference", *((sys.argv[1:] if argv is None else argv))])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
