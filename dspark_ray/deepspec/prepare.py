"""`dspark-ray deepspec prepare`: regenerate answers to prompts with the target itself.

Drafters are trained on what the TARGET says, not on the original text: the prompts (a JSONL file,
or def/class openings from the reference corpus's train split) are answered by the target through
our engine (greedy or sampled, batched; any drafter, since the engine is lossless) or by any
OpenAI-compatible endpoint serving it (`--endpoint`, only the text is used, tokenized here).
Answers are appended to `<out>/data.jsonl` as they finish; a rerun skips ids already there.
`--cache-features` then stores the target's states for every record (see feature_cache.py);
without it, training recomputes them on the fly. The dataset records its target (`target.json`:
the target directory and its tokenizer's fingerprint), so `train --data` needs no `--target`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dspark_ray.config import DEFAULT_TARGET_DIR, EngineConfig, resolve_target
from dspark_ray.core.sampling import SamplingParams
from dspark_ray.deepspec.records import DATA_NAME, Record, append_records, read_prompt_file, read_records
from dspark_ray.target_record import check_record, make_record, read_record, write_record

CORPUS_NUM_PROMPTS = 512


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("prepare", help="regenerate answers to prompts with the target (resumable)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (data.jsonl, features/)")
    parser.add_argument("--target", type=Path, default=None,
                        help="target HF directory (default: the one --out records, else the bundled one)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", type=Path, help='JSONL of {"prompt": ..., optional "id": ...}')
    source.add_argument("--corpus-split", choices=["train"], default=None,
                        help="def/class openings from the bundled reference corpus split (the default for the "
                             "bundled target only)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help=f"most prompts used (default: all of --prompts; {CORPUS_NUM_PROMPTS} from the corpus)")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="prompt order and per-request sampling seeds")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--drafter", choices=["none", "ngram", "model"], default="none",
                        help="engine drafter used to regenerate (lossless: same answers, maybe faster)")
    parser.add_argument("--draft", type=Path, default=None, help="draft LM directory for --drafter model")
    parser.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    parser.add_argument("--model", default=None, help="model name at the endpoint")
    parser.add_argument("--api-key", default="EMPTY", help="API key for the endpoint")
    parser.add_argument("--cache-features", action="store_true", help="also write the target's states to disk")
    parser.add_argument("--target-layer-ids", default=None,
                        help="comma-separated target layers to cache (default: 3 spread over the target)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)


def request_seed(seed: int, record_id: str) -> int:
    """A per-prompt seed that does not depend on batching or on which prompts were done before."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:7], "big")


def load_prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.prompts is not None:
        return read_prompt_file(args.prompts)[: args.num_prompts]
    if args.corpus_split is None and args.target.resolve() != DEFAULT_TARGET_DIR.resolve():
        raise ValueError(f"name the prompts for target {args.target} (--prompts FILE); the bundled corpus "
                         "(--corpus-split train) is the bundled target's")
    from dspark_ray.deepspec.corpus_prompts import corpus_prompts
    return corpus_prompts(args.num_prompts or CORPUS_NUM_PROMPTS, args.seed, args.corpus_split or "train")


def claim_dataset(out: Path, target: Path, weights_fingerprint: str | None) -> None:
    """Refuse to add to a dataset of another target; record the target of a new dataset (an old one
    without a record keeps none: its first answers may come from another target)."""
    has_records = bool(read_records(out / DATA_NAME))
    if has_records or read_record(out) is not None:
        check_record(out, target, "the dataset", weights_fingerprint)
    if not has_records and read_record(out) is None:
        write_record(out, make_record(target, weights_fingerprint))


def generate_with_engine(args: argparse.Namespace, todo: list[tuple[str, str]], out: Path) -> None:
    from dspark_ray.dspark.signature import target_fingerprint
    from dspark_ray.engine.factory import build_engine, load_models
    from dspark_ray.engine.sequence import GenerationRequest

    fields = dict(target=args.target, drafter=args.drafter, max_batch_size=args.batch_size)
    if args.draft is not None:
        fields["draft"] = args.draft
    config = EngineConfig(**fields)
    models = load_models(config)
    claim_dataset(out, args.target, target_fingerprint(models.target))
    engine = build_engine(config, models)
    pending = {}
    for record_id, prompt in todo:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                  seed=request_seed(args.seed, record_id))
        seq = engine.add_request(GenerationRequest(models.tokenizer.encode(prompt), sampling, args.max_tokens))
        pending[seq.seq_id] = (record_id, prompt, seq)
    finished_tokens = 0  # progress in tokens: a batch's answers all finish near the end
    with tqdm(total=len(todo) * args.max_tokens, desc="regenerate", unit="tok", mininterval=1.0) as bar:
        while engine.has_unfinished():
            finished = engine.step()
            records = [_record(pending.pop(seq.seq_id), models.tokenizer) for seq in finished]
            append_records(out / DATA_NAME, records)
            finished_tokens += sum(len(record.output_token_ids) for record in records)
            running = sum(len(seq.output_token_ids) for _, _, seq in pending.values())
            bar.update(finished_tokens + running - bar.n)
            bar.set_postfix_str(f"{len(todo) - len(pending)}/{len(todo)} answers", refresh=False)


def _record(item, tokenizer) -> Record:
    record_id, prompt, seq = item
    return Record(record_id, prompt, list(seq.request.prompt_token_ids), list(seq.output_token_ids),
                  tokenizer.decode(seq.output_token_ids, skip_special_tokens=True),
                  {"finish_reason": seq.finish_reason.value})


def generate_with_endpoint(args: argparse.Namespace, todo: list[tuple[str, str]], out: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from dspark_ray.engine.loading import load_tokenizer

    if not args.model:
        raise ValueError("--endpoint needs --model (the served model's name)")
    client = OpenAI(base_url=args.endpoint, api_key=args.api_key)
    tokenizer = load_tokenizer(args.target)
    claim_dataset(out, args.target, None)

    def complete(item: tuple[str, str]) -> Record:
        record_id, prompt = item
        response = client.completions.create(model=args.model, prompt=prompt, max_tokens=args.max_tokens,
                                             temperature=args.temperature, top_p=args.top_p,
                                             seed=request_seed(args.seed, record_id) % 2**31)
        text = response.choices[0].text
        return Record(record_id, prompt, tokenizer.encode(prompt), tokenizer.encode(text, add_special_tokens=False),
                      text, {"finish_reason": response.choices[0].finish_reason, "endpoint": args.endpoint})

    with ThreadPoolExecutor(max_workers=args.batch_size) as pool, \
            tqdm(total=len(todo), desc="regenerate", unit="seq") as bar:
        for record in pool.map(complete, todo):
            append_records(out / DATA_NAME, [record])
            bar.update(1)


def cache_features(args: argparse.Namespace, out: Path) -> None:
    from dspark_ray.deepspec.feature_cache import FeatureCache
    from dspark_ray.deepspec.target_pass import TargetPass
    from dspark_ray.dspark.config import spread_layer_ids
    from dspark_ray.engine.feature_capture import decoder_layers
    from dspark_ray.engine.loading import load_causal_lm

    target = load_causal_lm(args.target)
    layer_ids = parse_layer_ids(args.target_layer_ids) or list(spread_layer_ids(len(decoder_layers(target))))
    FeatureCache(out).write(read_records(out / DATA_NAME), TargetPass(target, layer_ids))


def parse_layer_ids(text: str | None) -> list[int] | None:
    return None if not text else [int(part) for part in text.split(",")]


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.target = resolve_target(args.target, [args.out])
        if read_record(args.out) is not None:  # before loading anything: resuming another target's data?
            check_record(args.out, args.target, "the dataset")
        prompts = load_prompts(args)
        done = {record.id for record in read_records(args.out / DATA_NAME)}
        todo = [(record_id, prompt) for record_id, prompt in prompts if record_id not in done]
        print(f"prepare: {len(prompts)} prompts, {len(prompts) - len(todo)} already done, {len(todo)} to go; "
              f"target {args.target}", flush=True)
        if todo:
            generate = generate_with_endpoint if args.endpoint else generate_with_engine
            generate(args, todo, args.out)
        if args.cache_features:
            cache_features(args, args.out)
    except (ValueError, OSError) as error:
        print(f"dspark-ray deepspec prepare: error: {error}", file=sys.stderr)
        return 2
    return 0
