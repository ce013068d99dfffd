"""`dspark-ray deepspec eval`: several drafters side by side on held-out prompts, same target, same
draft length: mean acceptance length, per-position acceptance, calibration of the confidence head
(reliability diagrams) and wall-clock speedup over target-only decoding by the same engine.

Each drafter is `name=DIR:KIND` (KIND: dspark, model, ngram; `name=ngram` needs no directory), e.g.
`dspark=assets/reference/dspark:dspark parallel=.../dspark_parallel_only:dspark draft_lm=DIR:model
ngram=ngram`. Every (drafter, verification schedule, batch size) is one run: all prompts decoded
with continuous batching up to that batch size, after an untimed warm-up; with `--repeats N` the
runs go in N rounds over all rows (interleaved) and the median wall time is kept. Greedy runs
also check the tokens equal target-only decoding.

Outputs in `--out DIR`: results.json, results.md (the table also printed), acceptance.png,
speedup.png and reliability_<name>.png per drafter with a confidence head. results.json and
results.md are rewritten as each run finishes (`"complete": false` until the last one), so an
interrupted eval keeps what it measured. The target defaults to the one the first drafter records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark_ray.config import EngineConfig, resolve_target
from dspark_ray.core.calibration import NUM_BINS, expected_calibration_error, reliability_table, survival_probs
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.deepspec.acceptance import RunOutcome, acceptance_records, run_recorded, summarize
from dspark_ray.deepspec.command import run_reporting_errors
from dspark_ray.deepspec.records import read_prompt_file
from dspark_ray.engine.drafters.scheduled import load_calibration
from dspark_ray.engine.sequence import GenerationRequest

KINDS = ("dspark", "model", "ngram")


@dataclass(frozen=True)
class DrafterSpec:
    name: str
    kind: str
    directory: Path | None

    @classmethod
    def parse(cls, text: str) -> "DrafterSpec":
        name, sep, rest = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected name=DIR:KIND or name=ngram, got {text!r}")
        if rest in KINDS:
            directory, kind = "", rest
        else:
            directory, _, kind = rest.rpartition(":")
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{text!r}: KIND must be one of {', '.join(KINDS)}")
        if kind != "ngram" and not directory:
            raise argparse.ArgumentTypeError(f"{text!r}: drafter kind {kind!r} needs a directory (name=DIR:{kind})")
        return cls(name, kind, Path(directory) if directory else None)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="compare drafters: acceptance, calibration, speedup",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=None,
                        help="target HF directory (default: the one the first drafter records, else the bundled one)")
    parser.add_argument("--drafters", type=DrafterSpec.parse, nargs="+", required=True, metavar="NAME=DIR:KIND")
    parser.add_argument("--prompts", type=Path, required=True, help='held-out JSONL of {"prompt": ...}')
    parser.add_argument("--num-prompts", type=int, default=None, help="most prompts used (default: all)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--num-speculative-tokens", type=int, default=8, help="draft length (block size) of every drafter")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="concurrent sequences per run")
    parser.add_argument("--schedules", nargs="+", choices=["fixed", "confidence"], default=["fixed"],
                        help="verification schedules; 'confidence' runs only for drafters with a confidence head")
    parser.add_argument("--sps-profile", type=Path, default=None,
                        help="target SPS profile for 'confidence' (default: <target>_profile.json)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (identity is then checked)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (median wall time)")
    parser.add_argument("--bins", type=int, default=NUM_BINS, help="equal-width calibration bins")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="per-request sampling seeds (seed + i)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)


def calibration_summary(outcome: RunOutcome, temperatures: list[float] | None, num_bins: int) -> dict | None:
    """ECE and reliability tables of the survival probabilities, raw and with the drafter's temperatures."""
    records = acceptance_records(outcome.steps)
    if records.num_steps == 0:
        return None
    prefix_accepted, drafted = records.labels()
    labels = prefix_accepted[drafted]
    summary = {"num_pairs": int(drafted.sum()), "temperatures": temperatures}
    for name, temps in (("raw", None), ("calibrated", temperatures)):
        if name == "calibrated" and temps is None:
            continue
        probs = survival_probs(records.confidence_logits, temps)[drafted]
        summary[f"ece_{name}"] = float(expected_calibration_error(probs, labels, num_bins))
        summary[f"reliability_{name}"] = asdict(reliability_table(probs, labels, num_bins))
    return summary


@dataclass
class Row:
    """One (drafter, schedule, batch size) of the comparison; `spec` None is target-only decoding."""

    spec: DrafterSpec | None
    config: EngineConfig
    models: object  # LoadedModels, shared by the rows of one drafter
    outcome: RunOutcome | None = None
    seconds: list[float] | None = None

    @property
    def label(self) -> str:
        name = self.spec.name if self.spec else "target-only"
        return f"{name} b={self.config.max_batch_size} {self.config.verification_schedule}"


def run_rows(rows: list[Row], requests: list[GenerationRequest], repeats: int,
             on_row: Callable[[], None] = lambda: None) -> None:
    """An untimed warm-up per row, then `repeats` rounds over all rows (interleaved, so load that
    comes and goes hits every row alike); each row keeps its wall times and its last outcome.
    `on_row` is called after each timed run."""
    from dspark_ray.engine.factory import build_engine

    warmup = [GenerationRequest(requests[0].prompt_token_ids, requests[0].sampling, min(8, requests[0].max_tokens))]
    for row in rows:
        run_recorded(build_engine(row.config, row.models), warmup)
        row.seconds = []
    for _ in range(repeats):
        for row in rows:
            row.outcome = run_recorded(build_engine(row.config, row.models), requests, progress=row.label)
            row.seconds.append(row.outcome.seconds)
            on_row()


def row_result(spec: DrafterSpec | None, config: EngineConfig, outcome: RunOutcome, seconds: list[float],
               baseline: dict | None, reference: list[list[int]] | None, num_bins: int) -> dict:
    median = statistics.median(seconds)
    summary = summarize(outcome.steps)
    tokens_per_s = outcome.num_tokens / median if median > 0 else 0.0
    temperatures = None
    if spec is not None and spec.directory is not None and spec.kind == "dspark":
        calibration = load_calibration(spec.directory)
        temperatures = calibration.temperatures if calibration else None
    return {
        "name": spec.name if spec else "target-only",
        "kind": spec.kind if spec else "none",
        "directory": str(spec.directory) if spec and spec.directory else None,
        "schedule": config.verification_schedule,
        "batch_size": config.max_batch_size,
        "num_speculative_tokens": config.num_speculative_tokens,
        "num_prompts": len(outcome.outputs),
        "num_tokens": outcome.num_tokens,
        "seconds": median,
        "seconds_all": seconds,
        "tokens_per_s": tokens_per_s,
        "speedup_vs_target_only": tokens_per_s / baseline["tokens_per_s"] if baseline else 1.0,
        "identical_to_target_only": None if reference is None else outcome.outputs == reference,
        "draft_ms_per_step": 1e3 * outcome.draft_seconds / outcome.num_proposals if outcome.num_proposals else 0.0,
        **asdict(summary),
        "calibration": calibration_summary(outcome, temperatures, num_bins),
    }


def evaluate(args: argparse.Namespace, on_progress: Callable[[list[dict]], None] = lambda results: None) -> list[dict]:
    """All rows' results; `on_progress` gets the results so far after each timed run."""
    from dspark_ray.engine.factory import load_models
    from dspark_ray.engine.loading import load_tokenizer

    args.target = resolve_target(args.target, [spec.directory for spec in args.drafters])
    prompts = read_prompt_file(args.prompts)[: args.num_prompts]
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompts")
    tokenizer = load_tokenizer(args.target)
    requests = [GenerationRequest(tokenizer.encode(prompt), SamplingParams(temperature=args.temperature,
                                                                          seed=args.seed + index), args.max_tokens)
                for index, (_, prompt) in enumerate(prompts)]
    base = dict(target=args.target, num_speculative_tokens=args.num_speculative_tokens, dtype=args.dtype,
                device=args.device, adaptive_speculation="off", sps_profile=args.sps_profile,
                load_aware_drafting=False)  # the drafter is measured, not the serving policy
    target_only = EngineConfig(**base, drafter="none", draft=None)
    models = load_models(target_only)
    rows = [Row(None, target_only.model_copy(update={"max_batch_size": batch_size}), models)
            for batch_size in args.batch_sizes]
    for spec in args.drafters:
        drafter_config = EngineConfig(**base, drafter=spec.kind, draft=spec.directory)
        models = load_models(drafter_config)
        schedules = [s for s in args.schedules if s == "fixed" or spec.kind == "dspark"]
        rows += [Row(spec, drafter_config.model_copy(update={"max_batch_size": batch_size,
                                                            "verification_schedule": schedule}), models)
                 for batch_size in args.batch_sizes for schedule in schedules]
    run_rows(rows, requests, args.repeats, lambda: on_progress(results_of(rows, args)))
    return results_of(rows, args)


def results_of(rows: list[Row], args: argparse.Namespace) -> list[dict]:
    """Results of the rows run so far (target-only first: every drafter row is compared with it)."""
    done = [row for row in rows if row.outcome is not None]
    baselines = {row.config.max_batch_size: row_result(None, row.config, row.outcome, row.seconds, None, None,
                                                       args.bins)
                 for row in done if row.spec is None}
    references = {row.config.max_batch_size: row.outcome.outputs if args.temperature == 0 else None
                  for row in done if row.spec is None}
    return list(baselines.values()) + [
        row_result(row.spec, row.config, row.outcome, row.seconds, baselines[row.config.max_batch_size],
                   references[row.config.max_batch_size], args.bins)
        for row in done if row.spec is not None and row.config.max_batch_size in baselines]


def format_table(results: list[dict]) -> str:
    header = ("| drafter | kind | schedule | batch | mean acceptance length | drafts/step | "
              "acceptance by position | draft ms/step | tokens/s | speedup | identical | ECE raw -> calibrated |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in results:
        calibration = row["calibration"]
        ece = "" if calibration is None else f"{calibration['ece_raw']:.3f}" + (
            f" -> {calibration['ece_calibrated']:.3f}" if "ece_calibrated" in calibration else "")
        identical = {None: "n/a", True: "yes", False: "NO"}[row["identical_to_target_only"]]
        positions = " ".join(f"{rate:.2f}" for rate in row["survival_per_position"])
        lines.append(f"| {row['name']} | {row['kind']} | {row['schedule']} | {row['batch_size']} | "
                     f"{row['mean_acceptance_length']:.3f} | {row['mean_draft_tokens']:.2f} | {positions} | "
                     f"{row['draft_ms_per_step']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{row['speedup_vs_target_only']:.2f}x | {identical} | {ece} |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plots (pip install 'dspark-ray[plot]')", file=sys.stderr)
        return []
    written = []
    drafters = [row for row in results if row["kind"] != "none"]
    first = {}
    for row in drafters:  # the first run of each drafter (first batch size, fixed schedule) for the curves
        first.setdefault(row["name"], row)

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in first.values():
        positions = range(1, len(row["survival_per_position"]) + 1)
        axes[0].plot(positions, row["survival_per_position"], marker="o", label=row["name"])
        axes[1].plot(positions, row["conditional_per_position"], marker="o", label=row["name"])
    axes[0].set(title="P(drafts 1..k all accepted)", xlabel="draft position k", ylim=(0, 1.02))
    axes[1].set(title="P(draft k accepted | 1..k-1 accepted)", xlabel="draft position k", ylim=(0, 1.02))
    axes[0].legend()
    figure.tight_layout()
    written.append(_save(figure, out / "acceptance.png", plt))

    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(drafters) + 2), 4))
    labels = [f"{row['name']}\n{row['schedule']} b={row['batch_size']}" for row in drafters]
    axis.bar(range(len(drafters)), [row["speedup_vs_target_only"] for row in drafters])
    axis.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(drafters)), labels, fontsize=7)
    axis.set(ylabel="tokens/s vs target-only", title="speedup over target-only decoding (same engine)")
    figure.tight_layout()
    written.append(_save(figure, out / "speedup.png", plt))

    for row in first.values():
        if row["calibration"] is not None:
            written.append(_reliability_plot(row, out / f"reliability_{row['name']}.png", plt))
    return written


def _reliability_plot(row: dict, path: Path, plt) -> Path:
    calibration = row["calibration"]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect")
    for name in ("raw", "calibrated"):
        table = calibration.get(f"reliability_{name}")
        if table is None:
            continue
        points = [(c, a) for c, a, n in zip(table["mean_confidence"], table["accuracy"], table["count"]) if n > 0]
        axis.plot([c for c, _ in points], [a for _, a in points], marker="o",
                  label=f"{name} (ECE {calibration[f'ece_{name}']:.3f})")
    axis.set(xlabel="predicted survival probability", ylabel="observed: prefix fully accepted",
             title=f"{row['name']}: reliability", xlim=(0, 1), ylim=(0, 1))
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path, plt)


def _save(figure, path: Path, plt) -> Path:
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_results(args: argparse.Namespace, results: list[dict], complete: bool) -> str:
    """results.json and results.md (the table, returned); `complete` False while runs remain."""
    if not results:
        return ""
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                if key not in ("func", "drafters")}
    settings["drafters"] = [f"{spec.name}={spec.directory or ''}:{spec.kind}" for spec in args.drafters]
    settings["torch_threads"] = torch.get_num_threads()
    (args.out / "results.json").write_text(
        json.dumps({"settings": settings, "complete": complete, "runs": results}, indent=2) + "\n")
    table = format_table(results)
    (args.out / "results.md").write_text(
        f"# deepspec eval{'' if complete else ' (partial: runs remain)'}\n\n{results[0]['num_prompts']} prompts, "
        f"{args.max_tokens} tokens each, K={args.num_speculative_tokens}, temperature {args.temperature}, "
        f"{torch.get_num_threads()} threads; acceptance by position = P(drafts 1..k all accepted | k verified)."
        f"\n\n{table}\n")
    return table


def run(args: argparse.Namespace) -> int:
    def write_partial(partial: list[dict]) -> None:
        write_results(args, partial, complete=False)

    results = run_reporting_errors("eval", args, lambda: evaluate(args, write_partial))
    if results is None:
        return 2
    print(write_results(args, results, complete=True))
    written = plot(results, args.out)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
          + "".join(f", {path}" for path in written))
    return 0
