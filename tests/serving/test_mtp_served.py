"""`--drafter mtp` served: a Serve app on the tiny DeepSeek-V3 target with an MTP layer, queried
with the real `openai` client, alone and 4 at a time: greedy output identical to HF `generate`
on the target alone, and the MTP layer really drafting (the response's speculation stats)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from dspark_ray.config import EngineConfig
from dspark_ray.serving.config import AppConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # the engine tests' tiny models
from tiny_models import build_mtp_target, greedy_reference  # noqa: E402

PROMPTS = ["t5 t9 t13 t2 t7", "t3 t3", " ".join(f"t{i}" for i in range(10, 40)), "t44", "t7 t100 t21 t8 t8 t150"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def mtp_app(deploy_app, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mtp-target")
    build_mtp_target(directory)
    engine = EngineConfig(target=directory, drafter="mtp", num_speculative_tokens=3, load_aware_drafting=False)
    config = AppConfig(model_name="mtp", engine=engine, model_server_num_cpus=0.5, router_num_cpus=0.25)
    return deploy_app("mtp", "/mtp", config), directory


def test_openai_client_greedy_identical_to_target_alone(mtp_app) -> None:
    from dspark_ray.engine.loading import load_causal_lm, load_tokenizer

    app, directory = mtp_app
    target, tokenizer = load_causal_lm(directory), load_tokenizer(directory)
    client = openai.OpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=120)

    def complete(prompt: str):
        return client.completions.create(model="mtp", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True})

    alone = [complete(prompt) for prompt in PROMPTS[:2]]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(complete, PROMPTS))
    for prompt, response in zip(PROMPTS[:2] + PROMPTS, alone + together):
        expected = greedy_reference(target, tokenizer.encode(prompt), MAX_TOKENS)
        assert response.choices[0].model_extra["token_ids"] == expected, prompt
    assert sum(response.model_extra["dspark"]["num_draft_tokens"] for response in together) > 0
