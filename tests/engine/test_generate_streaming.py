"""`dspark-ray generate --prompts` prints each result as it finishes (issue 26, finding 6), not
all of them once the last is done."""

from __future__ import annotations

import json

from dspark_ray.cli import main
from dspark_ray.config import EngineConfig
from dspark_ray.engine.factory import build_engine, load_models
from dspark_ray.engine.sequence import GenerationRequest
from dspark_ray.generate_cli import timed_generate


def test_results_come_as_each_sequence_finishes(tiny):
    config = EngineConfig(target=tiny("llama").target_dir, drafter="none", max_batch_size=2)
    engine = build_engine(config, load_models(config))
    results = timed_generate(engine, [GenerationRequest([11, 12], max_tokens=16), GenerationRequest([21], max_tokens=2)])
    index, first = next(iter(results))
    assert index == 1 and len(first.seq.output_token_ids) == 2
    assert engine.has_unfinished()  # the long one is still decoding
    assert [index for index, _ in results] == [0]


def test_json_lines_say_which_prompt(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "t5 t6"}) + "\n" + json.dumps({"prompt": "t7"}) + "\n")
    assert main(["generate", "--target", str(tiny("llama").target_dir), "--drafter", "none", "--prompts", str(prompts),
                 "--max-tokens", "3", "--json", "--threads", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((line["index"], line["prompt"]) for line in lines) == [(0, "t5 t6"), (1, "t7")]
