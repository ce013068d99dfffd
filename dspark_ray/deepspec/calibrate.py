"""`dspark-ray deepspec calibrate`: fit the temperatures that calibrate a DSpark drafter's survival
probabilities (sequential temperature scaling) on held-out prompts.

The drafter runs against the target through the engine with every draft verified (fixed
schedule, `--num-speculative-tokens`, default the drafter's block size). Each verification step
gives, per verified draft position, the confidence logit and whether the prefix up to it was
accepted. Prompts are split (seeded) into a fit part and a held-out part; the temperatures are
fitted on the first and kept only where they lower the held-out ECE (elsewhere 1: calibration
never makes it worse, see core/calibration.py), ECE is reported on both, and `calibration.json` is
written into the drafter directory, where `--verification-schedule confidence` reads it. With
`--target-ece`, the command exits 1 when the held-out ECE misses it. The target defaults to the one
the drafter records.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from dspark_ray.config import EngineConfig
from dspark_ray.core.calibration import NUM_BINS, Calibration, CalibrationReport, calibrate
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.deepspec.acceptance import RunOutcome, acceptance_records, run_recorded
from dspark_ray.deepspec.records import read_prompt_file
from dspark_ray.engine.drafters.scheduled import CALIBRATION_FILE, save_calibration
from dspark_ray.engine.sequence import GenerationRequest

def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="fit the confidence temperatures of a DSpark drafter",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=Path, default=None,
                        help="DSpark drafter directory (default: the bundled one, for the bundled target only)")
    parser.add_argument("--target", type=Path, default=None,
                        help="target HF directory (default: the one the drafter records)")
    parser.add_argument("--prompts", type=Path, required=True, help='held-out JSONL of {"prompt": ...}')
    parser.add_argument("--num-prompts", type=int, default=None, help="most prompts used (default: all)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="drafts verified per step (default: the drafter's block size)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of the runs (acceptance differs under sampling; 0 = greedy)")
    parser.add_argument("--heldout-fraction", type=float, default=0.3,
                        help="share of prompts kept out of the fit, to check it on (> 0)")
    parser.add_argument("--target-ece", type=float, default=None,
                        help="exit 1 unless the held-out ECE after calibration is at most this")
    parser.add_argument("--bins", type=int, default=NUM_BINS, help="equal-width ECE bins")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--seed", type=int, default=0, help="prompt split and sampling seeds")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write (default: <draft>/{CALIBRATION_FILE})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)


def split_prompts(prompts: list[tuple[str, str]], heldout_fraction: float, seed: int):
    """(fit, heldout) lists of prompts; seeded, so a rerun reports on the same held-out prompts."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    num_heldout = int(round(len(prompts) * heldout_fraction))
    if 0 < heldout_fraction and len(prompts) - num_heldout < 1:
        num_heldout = len(prompts) - 1
    heldout = set(order[:num_heldout])
    return ([p for i, p in enumerate(prompts) if i not in heldout], [p for i, p in enumerate(prompts) if i in heldout])


def fit_calibration(fit: RunOutcome, heldout: RunOutcome | None, num_bins: int) -> Calibration:
    heldout_records = acceptance_records(heldout.steps) if heldout is not None else None
    return calibrate(acceptance_records(fit.steps), heldout_records, num_bins)


def format_report(calibration: Calibration) -> str:
    lines = [f"temperatures: {' '.join(f'{t:.3f}' for t in calibration.temperatures)}"]
    identity, edge = calibration.identity_positions, calibration.at_grid_edge()
    if len(identity) == len(calibration.temperatures):
        lines.append("no temperature lowered the held-out ECE: all stay 1 (the drafter's raw confidence)")
    elif identity:
        lines.append(f"positions {' '.join(map(str, identity))} stay at temperature 1: scaling them did not lower "
                     "the held-out ECE")
    if edge:
        lines.append(f"positions {' '.join(map(str, edge))}: temperature at the edge of the search grid")
    reports: list[tuple[str, CalibrationReport]] = [("fit", calibration.fit)]
    if calibration.heldout is not None:
        reports.append(("held-out", calibration.heldout))
    for name, report in reports:
        lines.append(f"{name:>8}: {report.num_steps} steps, {report.num_pairs} (step, position) pairs; "
                     f"ECE of survival probabilities {report.ece_before:.4f} -> {report.ece_after:.4f}")
        per_position = " ".join(f"{k + 1}:{b:.3f}->{a:.3f}" for k, (b, a) in
                                enumerate(zip(report.ece_before_per_position, report.ece_after_per_position)))
        lines.append(f"{'':>8}  per position {per_position}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dspark_ray.dspark.io import read_dspark_config
    from dspark_ray.engine.factory import build_engine, load_models

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prompts = read_prompt_file(args.prompts)[: args.num_prompts]
        if not prompts:
            raise ValueError(f"{args.prompts} holds no prompts")
        fit_prompts, heldout_prompts = split_prompts(prompts, args.heldout_fraction, args.seed)
        if not heldout_prompts:
            raise ValueError("calibration is checked on held-out prompts: give at least 2 prompts and "
                             "--heldout-fraction > 0")
        config = EngineConfig(target=args.target, draft=args.draft, drafter="dspark", dtype=args.dtype,
                              device=args.device, max_batch_size=args.batch_size,
                              load_aware_drafting=False)  # every step drafts: calibration needs drafts
        num_speculative_tokens = args.num_speculative_tokens or read_dspark_config(config.draft).block_size
        config = config.model_copy(update={"num_speculative_tokens": num_speculative_tokens})
        models = load_models(config)
    except (ValueError, OSError) as error:
        print(f"dspark-ray deepspec calibrate: error: {error}", file=sys.stderr)
        return 2

    def decode(part: list[tuple[str, str]], name: str) -> RunOutcome:
        requests = [GenerationRequest(models.tokenizer.encode(prompt),
                                      SamplingParams(temperature=args.temperature, seed=args.seed + index),
                                      args.max_tokens)
                    for index, (_, prompt) in enumerate(part)]
        return run_recorded(build_engine(config, models), requests, progress=name)

    fit = decode(fit_prompts, "fit prompts")
    heldout = decode(heldout_prompts, "held-out prompts")
    try:
        calibration = fit_calibration(fit, heldout, args.bins)
    except ValueError as error:
        print(f"dspark-ray deepspec calibrate: error: {error}", file=sys.stderr)
        return 1
    path = args.out or config.draft / CALIBRATION_FILE
    save_calibration(calibration, path)
    print(f"prompts: {len(fit_prompts)} fit, {len(heldout_prompts)} held out; K={num_speculative_tokens}, "
          f"temperature {args.temperature}")
    print(format_report(calibration))
    print(f"held-out ECE {calibration.heldout.ece_before:.4f} uncalibrated -> {calibration.ece_after:.4f}; wrote {path}")
    if args.target_ece is None:
        return 0
    meets = calibration.ece_after <= args.target_ece
    print(f"held-out ECE {calibration.ece_after:.4f} {'meets' if meets else 'MISSES'} the target <= {args.target_ece}")
    return 0 if meets else 1
