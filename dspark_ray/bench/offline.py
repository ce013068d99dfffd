"""`dspark-ray bench offline`: HF baselines and our engine on the same target, prompts and threads.

Every row decodes the same held-out prompts one at a time (batch 1, greedy), repetitions are
interleaved across rows, and medians are reported. DSpark rows (`engine_dspark`, and the
parallel-only ablation `engine_dspark_parallel_only`) appear when their drafter directories exist
and draft their full block (num_speculative_tokens = the drafter's block size). Speedups are ratios against the HF greedy
`generate` row of the same run. Each row's outputs are compared with HF greedy token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from dspark_ray.bench.forward_meter import ForwardMeter
from dspark_ray.config import DEFAULT_DRAFT_DIR, DEFAULT_DSPARK_DIR, DEFAULT_DSPARK_PARALLEL_ONLY_DIR, REFERENCE_DIR
from dspark_ray.dspark.io import load_dspark
from dspark_ray.engine.factory import LoadedModels, build_engine, load_models
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.engine.threads import configure_threads
from dspark_ray.generate_cli import add_engine_arguments, engine_config_from_args

DEFAULT_PROMPTS = REFERENCE_DIR / "prompts" / "heldout.jsonl"


@dataclass
class RowStats:
    name: str
    seconds: list[float] = field(default_factory=list)  # one entry per repetition
    num_tokens: int = 0
    target_forwards: int = 0
    target_seconds: float = 0.0
    draft_seconds: float = 0.0
    num_steps: int = 0
    num_accepted_tokens: int = 0
    identical_to_hf_greedy: bool | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.median_s

    @property
    def mean_acceptance_length(self) -> float | None:
        return 1 + self.num_accepted_tokens / self.num_steps if self.num_steps else None


class Row:
    """One way of decoding; `decode` returns the generated ids of each prompt."""

    def __init__(self, name: str, decode, draft_module: torch.nn.Module | None = None) -> None:
        self.name, self.decode = name, decode
        self.draft_meter = ForwardMeter(draft_module) if draft_module is not None else None


def hf_greedy_row(models: LoadedModels, max_tokens: int) -> Row:
    def decode(prompt_ids: list[int]):
        output = models.target.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens)
        return output[0, len(prompt_ids):].tolist(), None
    return Row("hf_generate_greedy", decode)


def hf_assisted_row(models: LoadedModels, max_tokens: int) -> Row:
    def decode(prompt_ids: list[int]):
        output = models.target.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens,
                                        assistant_model=models.draft)
        return output[0, len(prompt_ids):].tolist(), None
    return Row("hf_assisted_draft_lm", decode)


def engine_row(name: str, config, models: LoadedModels, max_tokens: int,
               draft_module: torch.nn.Module | None = None) -> Row:
    def decode(prompt_ids: list[int]):
        engine = build_engine(config, models)
        (seq,) = engine.generate([GenerationRequest(prompt_ids, max_tokens=max_tokens)])
        return seq.output_token_ids, seq.stats
    return Row(name, decode, draft_module)


def dspark_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """Row name -> DSpark drafter directory, for those that exist."""
    main = args.draft if args.drafter == "dspark" and args.draft is not None else DEFAULT_DSPARK_DIR
    dirs = {"engine_dspark": main, "engine_dspark_parallel_only": args.dspark_parallel_only}
    return {name: Path(d) for name, d in dirs.items() if (Path(d) / "config.json").is_file()}


def dspark_rows(args: argparse.Namespace, models: LoadedModels) -> list[Row]:
    rows = []
    for name, directory in dspark_dirs(args).items():
        dspark = load_dspark(directory, models.target, args.dtype)
        config = engine_config_from_args(args, drafter="dspark", draft=directory,
                                         num_speculative_tokens=dspark.block_size)
        rows.append(engine_row(name, config, replace(models, dspark=dspark), args.max_tokens, dspark))
    return rows


def build_rows(args: argparse.Namespace, models: LoadedModels) -> list[Row]:
    rows = [hf_greedy_row(models, args.max_tokens),
            engine_row("engine_none", engine_config_from_args(args, drafter="none"), models, args.max_tokens)]
    if models.draft is not None:
        rows.append(hf_assisted_row(models, args.max_tokens))
        for schedule in ("confidence", "heuristic", "off"):
            config = engine_config_from_args(args, drafter="model", draft=draft_lm_dir(args),
                                             adaptive_speculation=schedule)
            rows.append(engine_row(f"engine_draft_lm_{schedule}", config, models, args.max_tokens))
    rows.extend(dspark_rows(args, models))
    rows.append(engine_row("engine_ngram", engine_config_from_args(args, drafter="ngram"), models, args.max_tokens))
    return rows


def run_row(row: Row, prompts: list[list[int]], stats: RowStats, meters: dict[str, ForwardMeter]) -> list[list[int]]:
    for meter in [*meters.values(), *([row.draft_meter] if row.draft_meter else [])]:
        meter.reset()
    outputs, seq_stats = [], []
    start = time.perf_counter()
    for prompt_ids in prompts:
        tokens, step_stats = row.decode(prompt_ids)
        outputs.append(tokens)
        seq_stats.append(step_stats)
    stats.seconds.append(time.perf_counter() - start)
    stats.num_tokens = sum(len(tokens) for tokens in outputs)
    stats.target_forwards = meters["target"].calls
    stats.target_seconds = meters["target"].seconds
    draft_meter = row.draft_meter or meters.get("draft")
    stats.draft_seconds = draft_meter.seconds if draft_meter is not None else 0.0
    stats.num_steps = sum(s.num_steps for s in seq_stats if s is not None)
    stats.num_accepted_tokens = sum(s.num_accepted_tokens for s in seq_stats if s is not None)
    return outputs


def benchmark(args: argparse.Namespace) -> list[RowStats]:
    configure_threads(args.threads)
    models = load_models(engine_config_from_args(args, drafter="model", draft=draft_lm_dir(args))
                         if args.drafter in ("model", "dspark") else engine_config_from_args(args))
    prompts = load_prompt_ids(args.prompts, models, args.num_prompts)
    rows = build_rows(args, models)
    meters = {"target": ForwardMeter(models.target)}
    if models.draft is not None:
        meters["draft"] = ForwardMeter(models.draft)
    results = {row.name: RowStats(row.name) for row in rows}
    for row in rows:  # warm-up, untimed
        row.decode(prompts[0])
    reference: list[list[int]] | None = None
    for _ in tqdm(range(args.repetitions), desc="repetitions", file=sys.stderr):
        for row in rows:
            outputs = run_row(row, prompts, results[row.name], meters)
            reference = outputs if row.name == "hf_generate_greedy" else reference
            same = outputs == reference
            previous = results[row.name].identical_to_hf_greedy
            results[row.name].identical_to_hf_greedy = same if previous is None else previous and same
    return list(results.values())


def draft_lm_dir(args: argparse.Namespace) -> Path:
    """The draft LM of the draft-LM rows (`--draft` names the DSpark drafter under --drafter dspark)."""
    if args.draft_lm is not None:
        return args.draft_lm
    return args.draft if args.drafter == "model" and args.draft is not None else DEFAULT_DRAFT_DIR


def load_prompt_ids(path: Path, models: LoadedModels, limit: int) -> list[list[int]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [models.tokenizer.encode(record["prompt"]) for record in lines[:limit]]


def format_table(results: list[RowStats]) -> str:
    base = next(r for r in results if r.name == "hf_generate_greedy")
    assisted = next((r for r in results if r.name == "hf_assisted_draft_lm"), None)
    header = (f"{'row':<28} {'tok/s':>8} {'vs HF greedy':>12} {'vs HF assisted':>14} {'mean acc len':>12} "
              f"{'tok/fwd':>8} {'target s':>9} {'draft s':>8} {'other s':>8} {'identical':>9}")
    lines = [header, "-" * len(header)]
    for r in results:
        vs_assisted = f"{r.tokens_per_s / assisted.tokens_per_s:.2f}x" if assisted else "-"
        acceptance = f"{r.mean_acceptance_length:.2f}" if r.mean_acceptance_length else "-"
        other = r.seconds[-1] - r.target_seconds - r.draft_seconds
        lines.append(
            f"{r.name:<28} {r.tokens_per_s:>8.1f} {r.tokens_per_s / base.tokens_per_s:>11.2f}x {vs_assisted:>14} "
            f"{acceptance:>12} {r.num_tokens / max(1, r.target_forwards):>8.2f} {r.target_seconds:>9.2f} "
            f"{r.draft_seconds:>8.2f} {other:>8.2f} {str(r.identical_to_hf_greedy):>9}")
    return "\n".join(lines)


def to_json(results: list[RowStats], args: argparse.Namespace) -> dict:
    base = next(r for r in results if r.name == "hf_generate_greedy")
    rows = []
    for r in results:
        row = asdict(r)
        row.update(median_s=r.median_s, tokens_per_s=r.tokens_per_s, speedup_vs_hf_greedy=r.tokens_per_s / base.tokens_per_s,
                   mean_acceptance_length=r.mean_acceptance_length)
        rows.append(row)
    settings = {key: str(value) for key, value in vars(args).items() if key != "func"}
    return {"settings": settings, "threads": torch.get_num_threads(), "rows": rows}


def plot(results: list[RowStats], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.barh([r.name for r in results], [r.tokens_per_s for r in results])
    axis.set_xlabel("tokens/s (median, batch 1, greedy)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("offline", help="HF generate / assisted generation vs the engine's drafters",
                                   description=__doc__)
    add_engine_arguments(parser)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL of {\"prompt\": ...}")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_offline.json"), help="JSON results")
    parser.add_argument("--plot", type=Path, default=None, help="optional PNG bar chart")
    parser.add_argument("--draft-lm", type=Path, default=None,
                        help="draft LM of the draft-LM rows (default: --draft under --drafter model, else the bundled one)")
    parser.add_argument("--dspark-parallel-only", type=Path, default=DEFAULT_DSPARK_PARALLEL_ONLY_DIR,
                        help="DSpark parallel-only ablation directory (row engine_dspark_parallel_only if present)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = benchmark(args)
    print(f"threads={torch.get_num_threads()} prompts={args.num_prompts} max_tokens={args.max_tokens} "
          f"repetitions={args.repetitions} (medians)")
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(to_json(results, args), indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dspark_ray.bench.offline ...`: `dspark-ray bench offline` without the rest of the
    command line, which imports the serving stack (Ray) even for this (a GPU image without Ray)."""
    parser = argparse.ArgumentParser(prog="python -m dspark_ray.bench.offline")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["offline", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
