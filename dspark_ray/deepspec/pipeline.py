"""`dspark-ray deepspec run`: from a target and a prompt file to calibrated, evaluated drafters.

One command for the whole DeepSpec recipe, each stage the subcommand of its own name run in-process
(its command line is printed first): the prompts are split (seeded) into train, calibration and
eval parts; `prepare` answers the train part with the target; `train` builds the DSpark drafter,
the parallel-only ablation and a distilled draft LM; `calibrate` fits the DSpark drafter's
temperatures on the calibration part; `eval` compares the three with target-only decoding on the
eval part (results.json, results.md and plots in <out>/eval). Everything goes under `--out`.

The budget is kept by sizing the trainings: before them, the target's decoding speed is probed on
a few eval prompts and calibrate + eval are estimated from it and their prompt counts
(run_budget.py); what is left of the budget after `prepare` and that reserve is split between the
three trainings (their `--time-budget-s`). `prepare` answers every train prompt (size the file to
the time you have) and calibrate/eval run to the end, so the run can still go over (a slower
machine after the probe, a costlier drafter than allowed for): the last line says by how much, and
run.json records the estimate next to what calibrate and eval took.
`<out>/run.json` records each finished stage as it finishes; rerunning the same command skips
those and resumes the rest (prepare by prompt id, training from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import time
from pathlib import Path

from dspark_ray.deepspec.records import read_prompt_file
from dspark_ray.deepspec.run_budget import probe_seconds_per_prompt, reserve_seconds

TRAIN_SHARES = {"dspark": 0.4, "ablation": 0.3, "draft_lm": 0.3}
UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in '30m', '1.5h', '900s' or '900'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30m, 1h or 900s, got {text!r}")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="prepare, train (DSpark, ablation, draft LM), calibrate and eval",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, required=True, help="target HF directory")
    parser.add_argument("--prompts", type=Path, required=True, help='JSONL of {"prompt": ...}')
    parser.add_argument("--out", type=Path, required=True, help="run directory (resumable)")
    parser.add_argument("--budget", type=parse_duration, default=parse_duration("30m"),
                        help="wall-clock budget that sizes the trainings, e.g. 30m (default)")
    parser.add_argument("--calibration-prompts", type=int, default=32, help="prompts kept for calibrate")
    parser.add_argument("--eval-prompts", type=int, default=32, help="prompts kept for eval")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length in prepare, calibrate and eval")
    parser.add_argument("--train-steps", type=int, default=100_000,
                        help="most steps per training (the budget normally ends them first)")
    parser.add_argument("--seed", type=int, default=0, help="prompt split and training seeds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of every stage")
    parser.set_defaults(func=run)


def split_prompts(args: argparse.Namespace) -> dict[str, Path]:
    """<out>/prompts/{train,calibration,eval}.jsonl, written once (a rerun keeps the same split)."""
    directory = args.out / "prompts"
    paths = {name: directory / f"{name}.jsonl" for name in ("train", "calibration", "eval")}
    if all(path.is_file() for path in paths.values()):
        return paths
    prompts = read_prompt_file(args.prompts)
    random.Random(args.seed).shuffle(prompts)
    kept = args.calibration_prompts + args.eval_prompts
    if len(prompts) <= kept or min(args.calibration_prompts, args.eval_prompts) < 2:
        raise ValueError(f"{args.prompts} holds {len(prompts)} prompts: need more than --calibration-prompts + "
                         f"--eval-prompts ({kept}), each at least 2")
    parts = {"calibration": prompts[: args.calibration_prompts], "eval": prompts[args.calibration_prompts: kept],
             "train": prompts[kept:]}
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        paths[name].write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in part))
    return paths


def stage_commands(args: argparse.Namespace, prompts: dict[str, Path], train_budget_s: float) -> dict[str, list[str]]:
    out, common = args.out, (["--threads", str(args.threads)] if args.threads else [])
    train = ["deepspec", "train", "--data", str(out / "data"), "--steps", str(args.train_steps),
             "--seed", str(args.seed), "--resume", *common]
    budget = {name: ["--time-budget-s", f"{max(1.0, share * train_budget_s):.0f}"] for name, share in TRAIN_SHARES.items()}
    return {
        "prepare": ["deepspec", "prepare", "--target", str(args.target), "--prompts", str(prompts["train"]),
                    "--out", str(out / "data"), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), *common],
        "train dspark": [*train, "--out", str(out / "dspark"), *budget["dspark"]],
        "train ablation": [*train, "--out", str(out / "ablation"), "--sequential-head", "none", *budget["ablation"]],
        "train draft LM": [*train, "--out", str(out / "draft_lm"), "--draft-lm", *budget["draft_lm"]],
        "calibrate": ["deepspec", "calibrate", "--draft", str(out / "dspark"), "--prompts", str(prompts["calibration"]),
                      "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), *common],
        "eval": ["deepspec", "eval", "--target", str(args.target), "--prompts", str(prompts["eval"]),
                 "--drafters", f"dspark={out / 'dspark'}:dspark", f"parallel_only={out / 'ablation'}:dspark",
                 f"draft_lm={out / 'draft_lm'}:model", "--max-tokens", str(args.max_tokens),
                 "--out", str(out / "eval"), *common],
    }


def reserve(args: argparse.Namespace, prompts: dict[str, Path], state: dict) -> float:
    """Estimated seconds of calibrate + eval, probed once and kept in run.json (a rerun reuses it)."""
    if "reserve" not in state:
        eval_prompts = [prompt for _, prompt in read_prompt_file(prompts["eval"])]
        per_prompt = probe_seconds_per_prompt(args.target, eval_prompts, args.max_tokens, args.threads)
        estimate = reserve_seconds(per_prompt, args.calibration_prompts, args.eval_prompts, num_drafters=3)
        state["reserve"] = {"probe_seconds_per_prompt": round(per_prompt, 3), "estimate_s": round(estimate, 1)}
        print(f"[deepspec run] target decodes a prompt in {per_prompt:.2f} s at batch 1: calibrate + eval "
              f"estimated at {estimate:.0f} s, kept out of the training budget", flush=True)
    return state["reserve"]["estimate_s"]


def final_line(args: argparse.Namespace, spent: float, state: dict) -> str:
    """The closing summary: time against the budget, and the reserve estimate against what it took."""
    tail = "" if spent <= args.budget else f", {spent - args.budget:.0f} s OVER the budget"
    taken = [state["done"][name]["seconds"] for name in ("calibrate", "eval") if name in state["done"]]
    if "reserve" in state and len(taken) == 2:
        tail += f"; calibrate + eval took {sum(taken):.0f} s against {state['reserve']['estimate_s']:.0f} s estimated"
    return f"[deepspec run] all stages done in {spent:.0f} s this run (budget {args.budget:.0f} s{tail}); " \
           f"results in {args.out / 'eval'}"


def run(args: argparse.Namespace) -> int:
    from dspark_ray.cli import main

    started = time.perf_counter()
    state_path = args.out / "run.json"
    try:
        prompts = split_prompts(args)
    except (ValueError, OSError) as error:
        print(f"dspark-ray deepspec run: error: {error}", file=sys.stderr)
        return 2
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"done": {}}
    train_budget_s = None
    for name in ("prepare", "train dspark", "train ablation", "train draft LM", "calibrate", "eval"):
        if train_budget_s is None and name.startswith("train") and name not in state["done"]:
            reserved = reserve(args, prompts, state)  # sized once prepare is done
            train_budget_s = max(0.0, args.budget - reserved - (time.perf_counter() - started))
        command = stage_commands(args, prompts, train_budget_s or 0.0)[name]
        if name in state["done"]:
            print(f"[deepspec run] {name}: done in an earlier run, skipped", flush=True)
            continue
        print(f"[deepspec run] {name}: dspark-ray {shlex.join(command)}", flush=True)
        stage_started = time.perf_counter()
        code = main(command)
        if code != 0:
            print(f"[deepspec run] {name} failed (exit {code}); rerun the same command to resume", file=sys.stderr)
            return code
        state["done"][name] = {"seconds": round(time.perf_counter() - stage_started, 1), "command": command}
        state_path.write_text(json.dumps(state, indent=2) + "\n")
    print(final_line(args, time.perf_counter() - started, state), flush=True)
    return 0
