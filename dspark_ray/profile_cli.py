"""`dspark-ray profile`: measure the target's SPS(B) curve for confidence-scheduled verification."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dspark_ray.config import DEFAULT_TARGET_DIR
from dspark_ray.engine.loading import ModelLoadError, load_causal_lm
from dspark_ray.engine.profile import ProfileSettings, default_profile_path, measure_profile, save_profile


def add_parser(subparsers) -> None:
    defaults = ProfileSettings()
    parser = subparsers.add_parser(
        "profile", help="measure target verification steps per second vs tokens per batch (SPS curve)",
        description="Measure SPS(B), the target's verification steps per second when a step holds B tokens, "
                    "for --verification-schedule confidence. Measure on the hardware, dtype and threads you serve with.")
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET_DIR, help="target model directory (HF format)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=defaults.max_tokens_per_batch,
                        help="largest B measured (B = 1, 2, 4, ... up to it)")
    parser.add_argument("--tokens-per-sequence", type=int, default=defaults.tokens_per_sequence,
                        help="tokens each sequence verifies (1 + drafts); B / this many sequences")
    parser.add_argument("--context-length", type=int, default=defaults.context_length,
                        help="tokens already cached per sequence")
    parser.add_argument("--repeats", type=int, default=defaults.num_repeats, help="timed steps per B (median)")
    parser.add_argument("--out", type=Path, default=None,
                        help="profile JSON (default: <target>_profile.json next to the target directory)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.max_tokens_per_batch, args.tokens_per_sequence, args.context_length, args.repeats) < 1:
        print("dspark-ray profile: error: sizes and repeats must be >= 1", file=sys.stderr)
        return 2
    settings = ProfileSettings(args.max_tokens_per_batch, args.tokens_per_sequence, args.context_length, args.repeats)
    try:
        model = load_causal_lm(args.target, args.dtype, args.device)
        profile = measure_profile(model, settings, target=str(args.target))
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"dspark-ray profile: error: {error}", file=sys.stderr)
        return 2
    out = args.out or default_profile_path(args.target)
    save_profile(profile, out)
    print(f"{'B':>6} {'sequences':>9} {'step ms':>9} {'steps/s':>9} {'tokens/s':>10}")
    for point in profile["points"]:
        print(f"{point['num_tokens']:>6} {point['num_sequences']:>9} {point['step_time_s'] * 1e3:>9.2f} "
              f"{point['steps_per_second']:>9.1f} {point['steps_per_second'] * point['num_tokens']:>10.0f}")
    print(f"wrote {out}")
    return 0
