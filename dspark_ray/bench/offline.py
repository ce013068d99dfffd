"""`dspark-ray bench offline`: HF baselines and our engine on the same target, prompts and threads.

Works on any pair: `--target DIR` and `--draft DIR` (the draft LM), `--dspark DIR` for a DSpark
drafter trained for that target; each a local directory or a hub id (its snapshot in the HF cache);
the bundled pair is the default. Rows: HF greedy `generate`; HF
assisted generation with the draft LM, with HF's defaults and with each fixed
`num_assistant_tokens` of `--hf-assistant-tokens` (schedule "constant", no confidence stop), the
fastest of which is the "best fixed" baseline; the engine with no drafter, with the draft LM (the
command's engine flags), with DSpark (its full block), with an MTP layer drafting one token (MTP-1:
the layer the target's checkpoint ships, or `--mtp DIR`'s) and with n-gram lookup. Rows without
their models (no draft LM, no DSpark drafter, no MTP layer for this target) are skipped with a
line saying why.

Every row decodes the same prompts one at a time (batch 1, greedy); repetitions are interleaved
across rows (reversed every other repetition) and medians reported. Each row's outputs are compared
with HF greedy's token for token in every repetition, and the table says whether all were identical.

Efficiency = measured speedup over HF greedy / (L x t_target_decode / (t_verify + t_draft)): L is
the row's mean acceptance length (tokens per verification step), t_target_decode HF greedy's mean
one-token target forward, t_verify the row's mean target forward, t_draft its draft forward time per
step. Each prompt's first target forward (its prefill) is left out of both forward means. The bound
is the speedup if nothing but forwards cost time; HF greedy's own time outside its forwards counts
in the row's favour.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from dspark_ray.bench.forward_meter import ForwardMeter
from dspark_ray.bench.repetitions import interleaved
from dspark_ray.config import (DEFAULT_DRAFT_DIR, DEFAULT_DSPARK_DIR, DEFAULT_DSPARK_PARALLEL_ONLY_DIR,
                               DEFAULT_TARGET_DIR, REFERENCE_DIR, resolve_target)
from dspark_ray.dspark.io import load_dspark
from dspark_ray.engine.drafters.mtp import load_mtp
from dspark_ray.engine.factory import LoadedModels, build_engine, load_models
from dspark_ray.engine.loading import ModelLoadError
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.engine.threads import configure_threads
from dspark_ray.generate_cli import add_engine_arguments, engine_config_from_args

DEFAULT_PROMPTS = REFERENCE_DIR / "prompts" / "heldout.jsonl"
HF_GREEDY = "hf_generate_greedy"
HF_ASSISTED = "hf_assisted_defaults"
HF_FIXED_PREFIX = "hf_assisted_k"


@dataclass
class Run:
    """One repetition of one row over all prompts."""
    seconds: float
    num_tokens: int
    num_steps: int  # verification steps (HF rows: target forwards, each of which yields tokens)
    num_accepted_tokens: int
    target_forwards: int
    target_seconds: float
    prefill_seconds: float  # the first target forward of each prompt
    num_prefills: int
    draft_seconds: float

    @property
    def acceptance_length(self) -> float | None:
        return 1 + self.num_accepted_tokens / self.num_steps if self.num_steps else None

    @property
    def verify_s(self) -> float | None:
        """Mean target forward after each prompt's prefill."""
        forwards = self.target_forwards - self.num_prefills
        return (self.target_seconds - self.prefill_seconds) / forwards if forwards else None

    @property
    def draft_s(self) -> float:
        return self.draft_seconds / self.num_steps if self.num_steps else 0.0

    @property
    def other_s(self) -> float:
        return self.seconds - self.target_seconds - self.draft_seconds


@dataclass
class RowStats:
    name: str
    runs: list[Run] = field(default_factory=list)
    identical_to_hf_greedy: bool | None = None

    def median(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.runs]
        return statistics.median(values) if None not in values else None

    @property
    def tokens_per_s(self) -> float:
        return self.runs[0].num_tokens / self.median("seconds")

    def efficiency(self, speedup: float, target_decode_s: float | None) -> tuple[float | None, float | None]:
        """(bound, measured speedup / bound); None where a forward mean is missing."""
        length, verify_s = self.median("acceptance_length"), self.median("verify_s")
        if length is None or verify_s is None or target_decode_s is None:
            return None, None
        bound = length * target_decode_s / (verify_s + self.median("draft_s"))
        return bound, speedup / bound


class Row:
    """One way of decoding; `decode` returns the generated ids of a prompt and the engine's stats
    (None for HF rows)."""

    def __init__(self, name: str, decode, draft_module: torch.nn.Module | None = None) -> None:
        self.name, self.decode = name, decode
        self.draft_module = draft_module


def hf_greedy_row(models: LoadedModels, max_tokens: int) -> Row:
    def decode(prompt_ids: list[int]):
        output = models.target.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens)
        return output[0, len(prompt_ids):].tolist(), None
    return Row(HF_GREEDY, decode)


def hf_assisted_row(name: str, models: LoadedModels, max_tokens: int, settings: dict) -> Row:
    """HF assisted generation with `settings` on the assistant's generation config: HF reads
    `num_assistant_tokens`, its schedule and the confidence threshold from the assistant model, not
    from `generate`'s arguments. Each row sets its own config before every call."""
    config = copy.deepcopy(models.draft.generation_config)
    config.update(**settings)

    def decode(prompt_ids: list[int]):
        models.draft.generation_config = config
        output = models.target.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens,
                                        assistant_model=models.draft)
        return output[0, len(prompt_ids):].tolist(), None
    return Row(name, decode, models.draft)


def hf_fixed_settings(num_assistant_tokens: int) -> dict:
    """A fixed draft length: constant schedule, and no confidence stop (threshold 0 is off)."""
    return {"num_assistant_tokens": num_assistant_tokens, "num_assistant_tokens_schedule": "constant",
            "assistant_confidence_threshold": 0.0}


def engine_row(name: str, config, models: LoadedModels, max_tokens: int,
               draft_module: torch.nn.Module | None = None) -> Row:
    def decode(prompt_ids: list[int]):
        engine = build_engine(config, models)
        (seq,) = engine.generate([GenerationRequest(prompt_ids, max_tokens=max_tokens)])
        return seq.output_token_ids, seq.stats
    return Row(name, decode, draft_module)


@dataclass
class Pair:
    """The models of the run: the draft LM and DSpark drafters where given (None: their rows skip)."""
    target: Path
    draft_lm: Path | None
    dspark: dict[str, Path]  # row name -> DSpark drafter directory
    skipped: list[str]


def local_dir(name: Path | None) -> Path | None:
    """A model directory as given, or a hub id's snapshot in the HF cache (downloaded if missing
    and the hub is reachable): the engine loads local directories only."""
    if name is None or Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name)))


def resolve_pair(args: argparse.Namespace) -> Pair:
    """The bundled draft LM and DSpark drafters are defaults for the bundled target only: they were
    trained for it, and another target would reject or waste them."""
    target = resolve_target(args.target, [args.draft])
    bundled = target.resolve() == DEFAULT_TARGET_DIR.resolve()
    draft_lm = args.draft if args.draft is not None else (DEFAULT_DRAFT_DIR if bundled else None)
    dspark = {"engine_dspark": args.dspark, "engine_dspark_parallel_only": args.dspark_parallel_only}
    if bundled:
        defaults = {"engine_dspark": DEFAULT_DSPARK_DIR, "engine_dspark_parallel_only": DEFAULT_DSPARK_PARALLEL_ONLY_DIR}
        dspark = {name: directory or defaults[name] for name, directory in dspark.items()}
    skipped = []
    if draft_lm is None:
        skipped.append("HF assisted and engine_draft_lm rows skipped: no draft LM for this target (--draft DIR)")
    for name, directory in dspark.items():
        if directory is None or not (Path(directory) / "config.json").is_file():
            flag = "--dspark" if name == "engine_dspark" else "--dspark-parallel-only"
            skipped.append(f"{name} skipped: no DSpark drafter for this target ({flag} DIR)")
    dspark = {name: Path(d) for name, d in dspark.items() if d is not None and (Path(d) / "config.json").is_file()}
    return Pair(target, draft_lm, dspark, skipped)


def dspark_rows(args: argparse.Namespace, pair: Pair, models: LoadedModels) -> list[Row]:
    rows = []
    for name, directory in pair.dspark.items():
        dspark = load_dspark(directory, models.target, args.dtype)
        config = engine_config_from_args(args, drafter="dspark", draft=directory,
                                         num_speculative_tokens=dspark.block_size)
        rows.append(engine_row(name, config, replace(models, dspark=dspark), args.max_tokens, dspark))
    return rows


def draft_lm_rows(args: argparse.Namespace, pair: Pair, models: LoadedModels) -> list[Row]:
    rows = [hf_assisted_row(HF_ASSISTED, models, args.max_tokens, {})]
    rows += [hf_assisted_row(f"{HF_FIXED_PREFIX}{k}", models, args.max_tokens, hf_fixed_settings(k))
             for k in args.hf_assistant_tokens]
    config = engine_config_from_args(args, drafter="model", draft=pair.draft_lm)
    rows.append(engine_row("engine_draft_lm", config, models, args.max_tokens, models.draft))
    return rows


def mtp_rows(args: argparse.Namespace, pair: Pair, models: LoadedModels) -> list[Row]:
    """engine_mtp: the target's MTP layer drafting one token a step (MTP-1, the baseline the DSpark
    paper reports against): the one its checkpoint ships, or `--mtp DIR`'s."""
    directory = args.mtp or pair.target
    try:
        mtp = load_mtp(models.target, directory)
    except ModelLoadError as error:
        pair.skipped.append(f"engine_mtp skipped: {error} (--mtp DIR: one trained by `deepspec train-mtp`)")
        return []
    config = engine_config_from_args(args, drafter="mtp", draft=directory, num_speculative_tokens=1)
    return [engine_row("engine_mtp", config, replace(models, mtp=mtp), args.max_tokens, mtp.layers[0])]


def build_rows(args: argparse.Namespace, pair: Pair, models: LoadedModels) -> list[Row]:
    rows = [hf_greedy_row(models, args.max_tokens),
            engine_row("engine_none", engine_config_from_args(args, drafter="none"), models, args.max_tokens)]
    if models.draft is not None:
        rows += draft_lm_rows(args, pair, models)
    rows += dspark_rows(args, pair, models)
    rows += mtp_rows(args, pair, models)
    rows.append(engine_row("engine_ngram", engine_config_from_args(args, drafter="ngram"), models, args.max_tokens))
    return rows


def run_row(row: Row, prompts: list[list[int]], target_meter: ForwardMeter,
            draft_meter: ForwardMeter | None) -> tuple[list[list[int]], Run]:
    for meter in (target_meter, draft_meter):
        if meter is not None:
            meter.reset()
    outputs, seq_stats, first_forwards = [], [], []
    start = time.perf_counter()
    for prompt_ids in prompts:
        first_forwards.append(target_meter.calls)
        tokens, step_stats = row.decode(prompt_ids)
        outputs.append(tokens)
        seq_stats.append(step_stats)
    seconds = time.perf_counter() - start
    num_tokens = sum(len(tokens) for tokens in outputs)
    if all(s is not None for s in seq_stats):  # the engine's own count of verification steps
        num_steps = sum(s.num_steps for s in seq_stats)
        num_accepted = sum(s.num_accepted_tokens for s in seq_stats)
    else:  # HF: every target forward is one step and yields its accepted tokens plus one
        num_steps, num_accepted = target_meter.calls, num_tokens - target_meter.calls
    prefills = [target_meter.durations[i] for i in first_forwards if i < target_meter.calls]
    return outputs, Run(seconds, num_tokens, num_steps, num_accepted, target_meter.calls, target_meter.seconds,
                        sum(prefills), len(prefills), draft_meter.seconds if draft_meter is not None else 0.0)


def benchmark(args: argparse.Namespace, pair: Pair) -> list[RowStats]:
    configure_threads(args.threads)
    models = load_models(engine_config_from_args(args, drafter="model", draft=pair.draft_lm) if pair.draft_lm
                         else engine_config_from_args(args, drafter="none"))
    prompts = load_prompt_ids(args.prompts, models, args.num_prompts)
    rows = build_rows(args, pair, models)
    target_meter = ForwardMeter(models.target)
    draft_meters = {id(row.draft_module): ForwardMeter(row.draft_module) for row in rows if row.draft_module is not None}
    results = {row.name: RowStats(row.name) for row in rows}
    for row in rows:  # warm-up, untimed
        row.decode(prompts[0])
    outputs: dict[str, list[list[list[int]]]] = {row.name: [] for row in rows}  # row -> runs -> prompts -> ids
    for row in tqdm(list(interleaved(rows, args.repetitions)), desc="rows x repetitions", file=sys.stderr):
        row_outputs, run = run_row(row, prompts, target_meter, draft_meters.get(id(row.draft_module)))
        results[row.name].runs.append(run)
        outputs[row.name].append(row_outputs)
    reference = outputs[HF_GREEDY][0]
    for name, runs in outputs.items():
        results[name].identical_to_hf_greedy = all(run == reference for run in runs)
    return list(results.values())


def load_prompt_ids(path: Path, models: LoadedModels, limit: int) -> list[list[int]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [models.tokenizer.encode(record["prompt"]) for record in lines[:limit]]


@dataclass
class Baselines:
    """What every row is compared with: HF greedy, HF assisted with defaults and its best fixed length."""
    greedy: RowStats
    assisted: RowStats | None
    best_fixed: RowStats | None

    @classmethod
    def of(cls, results: list[RowStats]) -> Baselines:
        by_name = {r.name: r for r in results}
        fixed = [r for r in results if r.name.startswith(HF_FIXED_PREFIX)]
        return cls(by_name[HF_GREEDY], by_name.get(HF_ASSISTED),
                   max(fixed, key=lambda r: r.tokens_per_s) if fixed else None)

    @property
    def target_decode_s(self) -> float | None:
        return self.greedy.median("verify_s")


def row_figures(r: RowStats, base: Baselines) -> dict:
    speedup = r.tokens_per_s / base.greedy.tokens_per_s
    bound, efficiency = r.efficiency(speedup, base.target_decode_s)
    return {"tokens_per_s": r.tokens_per_s, "median_s": r.median("seconds"), "speedup_vs_hf_greedy": speedup,
            "vs_hf_assisted_defaults": r.tokens_per_s / base.assisted.tokens_per_s if base.assisted else None,
            "vs_hf_assisted_best_fixed": r.tokens_per_s / base.best_fixed.tokens_per_s if base.best_fixed else None,
            "mean_acceptance_length": r.median("acceptance_length"), "verify_ms": _ms(r.median("verify_s")),
            "draft_ms_per_step": _ms(r.median("draft_s")), "other_s": r.median("other_s"),
            "efficiency_bound": bound, "efficiency": efficiency, "identical_to_hf_greedy": r.identical_to_hf_greedy}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _cell(value: float | None, width: int, spec: str, suffix: str = "") -> str:
    return f"{'-' if value is None else f'{value:{spec}}{suffix}':>{width}}"


def format_table(results: list[RowStats]) -> str:
    base = Baselines.of(results)
    columns = [("tok/s", "tokens_per_s", 8, ".1f", ""), ("vs HF greedy", "speedup_vs_hf_greedy", 12, ".2f", "x"),
               ("vs HF asst", "vs_hf_assisted_defaults", 10, ".2f", "x"),
               ("vs HF best", "vs_hf_assisted_best_fixed", 10, ".2f", "x"),
               ("acc len", "mean_acceptance_length", 7, ".2f", ""), ("verify ms", "verify_ms", 9, ".2f", ""),
               ("draft ms", "draft_ms_per_step", 8, ".2f", ""), ("other s", "other_s", 7, ".2f", ""),
               ("bound", "efficiency_bound", 6, ".2f", "x"), ("effic.", "efficiency", 6, ".0%", "")]
    header = f"{'row':<28} " + " ".join(f"{title:>{width}}" for title, _, width, _, _ in columns) + f" {'identical':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        figures = row_figures(r, base)
        cells = " ".join(_cell(figures[key], width, spec, suffix) for _, key, width, spec, suffix in columns)
        lines.append(f"{r.name:<28} {cells} {str(r.identical_to_hf_greedy):>9}")
    if base.best_fixed is not None:
        swept = ", ".join(r.name[len(HF_FIXED_PREFIX):] for r in results if r.name.startswith(HF_FIXED_PREFIX))
        lines.append(f"HF assisted best fixed num_assistant_tokens: {base.best_fixed.name[len(HF_FIXED_PREFIX):]} "
                     f"(of {swept})")
    decode_ms = _ms(base.target_decode_s)
    lines.append(f"t_target_decode (HF greedy one-token forward): {'-' if decode_ms is None else f'{decode_ms:.2f}'} ms")
    return "\n".join(lines)


def to_json(results: list[RowStats], args: argparse.Namespace, pair: Pair) -> dict:
    base = Baselines.of(results)
    rows = [{**asdict(r), **row_figures(r, base)} for r in results]
    settings = {key: str(value) for key, value in vars(args).items() if key != "func"}
    return {"settings": settings, "threads": torch.get_num_threads(), "skipped": pair.skipped,
            "hf_assisted_best_fixed": base.best_fixed.name if base.best_fixed else None,
            "target_decode_ms": _ms(base.target_decode_s), "rows": rows}


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


def token_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts >= 1, got {text!r}")
    return counts


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("offline", help="HF generate / assisted generation vs the engine's drafters",
                                   description=__doc__.split("\n\n")[0])
    add_engine_arguments(parser)
    parser._option_string_actions["--draft"].help = ("draft LM directory of the HF assisted and engine_draft_lm rows "
                                                     "(default: the bundled one, for the bundled target only)")
    parser.add_argument("--dspark", type=Path, default=None,
                        help="DSpark drafter trained for --target (row engine_dspark; default: the bundled one, "
                             "for the bundled target only)")
    parser.add_argument("--dspark-parallel-only", type=Path, default=None,
                        help="DSpark parallel-only ablation (row engine_dspark_parallel_only; default: the bundled "
                             "one, for the bundled target only)")
    parser.add_argument("--mtp", type=Path, default=None,
                        help="checkpoint of an MTP layer for --target (row engine_mtp; default: the target's own, "
                             "where it ships one)")
    parser.add_argument("--hf-assistant-tokens", type=token_counts, default=[1, 2, 4, 8, 16], metavar="K,K,...",
                        help="fixed num_assistant_tokens of the HF assisted rows hf_assisted_k<K>; the fastest is "
                             "the 'best fixed' baseline")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL of {\"prompt\": ...}")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_offline.json"), help="JSON results")
    parser.add_argument("--plot", type=Path, default=None, help="optional PNG bar chart")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("target", "draft", "dspark", "dspark_parallel_only"):
        setattr(args, name, local_dir(getattr(args, name)))
    pair = resolve_pair(args)
    for line in pair.skipped:
        print(line, file=sys.stderr)
    results = benchmark(args, pair)
    print(f"target={pair.target} draft_lm={pair.draft_lm} threads={torch.get_num_threads()} "
          f"prompts={args.num_prompts} max_tokens={args.max_tokens} repetitions={args.repetitions} (medians)")
    print(format_table(results))
    for line in pair.skipped:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(to_json(results, args, pair), indent=2))
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
