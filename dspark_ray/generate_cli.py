"""`dspark-ray generate`: decode prompts with the engine, one batch of concurrent sequences."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dspark_ray.config import DEFAULT_DRAFT_DIR, DEFAULT_DSPARK_DIR, EngineConfig
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.engine.factory import LoadedModels, build_engine, load_models
from dspark_ray.engine.sequence import GenerationRequest, Sequence
from dspark_ray.engine.threads import configure_threads


def add_engine_arguments(parser: argparse.ArgumentParser, threads_default: str = "one per CPU other processes leave idle") -> None:
    """Flags shared by every command that builds an engine."""
    parser.add_argument("--target", type=Path, default=None,
                        help="target model directory (HF format; default: the one --draft records, else the bundled one)")
    parser.add_argument("--draft", type=Path, default=None,
                        help=f"drafter directory: the draft LM for --drafter model (default {DEFAULT_DRAFT_DIR}), a DSpark "
                             f"drafter for --drafter dspark (default {DEFAULT_DSPARK_DIR}); those defaults only for "
                             "the bundled target; the checkpoint of the target's MTP layer for --drafter mtp (default: "
                             "the target's own)")
    parser.add_argument("--drafter", choices=["model", "dspark", "mtp", "ngram", "none"], default="model",
                        help="how drafts are proposed ('mtp': the target's own MTP layer, DeepSeek-V3 checkpoints)")
    parser.add_argument("--num-speculative-tokens", type=int, default=EngineConfig.model_fields["num_speculative_tokens"].default,
                        help="most draft tokens per sequence and step")
    parser.add_argument("--adaptive-speculation", choices=["off", "confidence", "heuristic"], default="confidence",
                        help="per-step draft length schedule of drafter 'model'")
    parser.add_argument("--verification-schedule", choices=["fixed", "confidence"], default="fixed",
                        help="'confidence': DSpark's prefix scheduler picks each sequence's verified draft length "
                             "from calibrated confidence and the target's SPS profile; 'fixed' verifies all drafts")
    parser.add_argument("--sps-profile", type=Path, default=None,
                        help="target SPS profile JSON from `dspark-ray profile` (default: <target>_profile.json)")
    parser.add_argument("--load-aware-drafting", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.model_fields["load_aware_drafting"].default,
                        help="per batch size, draft greedy sequences only where timing shows drafting pays, "
                             "at the full or half draft length, whichever is faster")
    parser.add_argument("--max-drafting-batch-size", type=int, default=None, metavar="N",
                        help="greedy sequences draft only in steps of at most N sequences; larger steps decode "
                             "with the target alone, with no explorations (default: no cap)")
    parser.add_argument("--packed-forwards", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.model_fields["packed_forwards"].default,
                        help="feed the target's ragged forwards without padding (only real tokens reach its "
                             "linear layers and experts)")
    parser.add_argument("--fused-prefill", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.model_fields["fused_prefill"].default,
                        help="prefill newly admitted prompts in the same target forward as the running "
                             "sequences' verification (up to 64 tokens with packed forwards, 16 without)")
    parser.add_argument("--absorbed-mla", action=argparse.BooleanOptionalAction,
                        default=EngineConfig.model_fields["absorbed_mla"].default,
                        help="MLA targets (DeepSeek-V3): attend over the cached latents with kv_b_proj absorbed, "
                             "instead of expanding every cached slot at every step")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threads", type=int, default=None, help=f"torch CPU threads (default: {threads_default})")


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    fields = dict(target=args.target, drafter=args.drafter,
                  num_speculative_tokens=args.num_speculative_tokens,
                  adaptive_speculation=args.adaptive_speculation, dtype=args.dtype, device=args.device,
                  verification_schedule=args.verification_schedule, sps_profile=args.sps_profile,
                  load_aware_drafting=args.load_aware_drafting,
                  max_drafting_batch_size=args.max_drafting_batch_size, packed_forwards=args.packed_forwards,
                  fused_prefill=args.fused_prefill, absorbed_mla=args.absorbed_mla)
    if args.draft is not None:  # else EngineConfig's default for the drafter kind (bundled target only)
        fields["draft"] = args.draft
    return EngineConfig(**{**fields, **overrides})


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text for prompts with speculative decoding",
                                   description="Generate completions; all prompts decode together as one batch, "
                                               "each printed as soon as it finishes (--json says which prompt).")
    add_engine_arguments(parser)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": "..."} per line')
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 disables")
    parser.add_argument("--seed", type=int, default=None, help="per-request seed (prompt i uses seed + i)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON line per prompt with text, token ids and stats")
    parser.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    prompts = []
    for number, line in enumerate(args.prompts.read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{args.prompts}:{number}: expected {{\"prompt\": \"...\"}}")
            prompts.append(record["prompt"])
    return prompts


def run(args: argparse.Namespace) -> int:
    configure_threads(args.threads)
    try:
        prompts = read_prompts(args)
        config = engine_config_from_args(args, max_batch_size=max(1, len(prompts)))
        models = load_models(config)
        requests = [make_request(models, prompt, args, index) for index, prompt in enumerate(prompts)]
        engine = build_engine(config, models)
    except (ValueError, OSError) as error:
        print(f"dspark-ray generate: error: {error}", file=sys.stderr)
        return 2
    for index, result in timed_generate(engine, requests):
        print_result(models, prompts[index], result, args.json, index)
    return 0


def make_request(models: LoadedModels, prompt: str, args: argparse.Namespace, index: int) -> GenerationRequest:
    seed = None if args.seed is None else args.seed + index
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, seed=seed)
    return GenerationRequest(models.tokenizer.encode(prompt), sampling, args.max_tokens, tuple(args.stop))


class TimedSequence:
    def __init__(self, seq: Sequence, elapsed_s: float) -> None:
        self.seq, self.elapsed_s = seq, elapsed_s


def timed_generate(engine, requests: list[GenerationRequest]) -> Iterator[tuple[int, TimedSequence]]:
    """Run requests as one batch and yield (request index, result) as each one finishes; its elapsed
    time ends then."""
    index_of = {engine.add_request(request).seq_id: index for index, request in enumerate(requests)}
    start = time.perf_counter()
    while engine.has_unfinished():
        for seq in engine.step():
            yield index_of[seq.seq_id], TimedSequence(seq, time.perf_counter() - start)


def output_text(models: LoadedModels, seq: Sequence) -> str:
    text = models.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    return text if seq.stop_text_end is None else text[: seq.stop_text_end]


def print_result(models: LoadedModels, prompt: str, result: TimedSequence, as_json: bool, index: int) -> None:
    """One finished prompt (they print in the order they finish; JSON says which prompt it was)."""
    seq, text = result.seq, output_text(models, result.seq)
    if not as_json:
        print(prompt + text, flush=True)
        return
    stats = seq.stats
    print(json.dumps({
        "index": index,
        "prompt": prompt,
        "text": text,
        "token_ids": seq.output_token_ids,
        "finish_reason": seq.finish_reason.value,
        "num_generated_tokens": len(seq.output_token_ids),
        "num_steps": stats.num_steps,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
        "elapsed_s": round(result.elapsed_s, 4),
    }), flush=True)
