"""`dspark-ray bench serve --compare-url`: the served app against another OpenAI-compatible server
(a real HTTP server in this process running HF's greedy `generate`), and against servers that
differ from it."""

from __future__ import annotations

import json

import pytest
from fake_openai_server import FakeOpenAIServer, hf_greedy

from dspark_ray.bench.side_by_side import identical_requests
from dspark_ray.cli import main


@pytest.fixture(scope="module")
def hf_complete(model_dirs):
    return hf_greedy(model_dirs.target)


def compare_flags(ours: str, other: str, out, *extra: str) -> list[str]:
    return ["bench", "serve", "--url", ours, "--compare-url", other, "--concurrency", "1,2", "--num-requests", "4",
            "--max-tokens", "8", "--ignore-eos", "--repetitions", "2", "--json", str(out), *extra]


def test_served_app_against_hf_behind_another_server(served_app, hf_complete, tmp_path, capsys) -> None:
    out = tmp_path / "side_by_side.json"
    with FakeOpenAIServer(hf_complete) as other:
        assert main(compare_flags(served_app.base_url, other.base_url, out)) == 0
    result = json.loads(out.read_text())
    assert result["identical"] == [{"concurrency": c, "num_requests": 4, "num_identical": 4,
                                    "first_differing_request": None} for c in (1, 2)]
    for side in ("dspark-ray", "other"):
        assert [level["num_output_tokens"] for level in result[side]["levels"]] == [32, 32]
        assert all(len(level["output_tokens_per_s_runs"]) == 2 for level in result[side]["levels"])
        assert all("outputs" not in level for level in result[side]["levels"])
    assert result["other"]["model"] == "other" and result["dspark-ray"]["model"] == served_app.config.model_name
    table = capsys.readouterr().out
    assert "dspark-ray/other" in table and "c=2: 4/4 requests" in table and "NOT" not in table


def test_a_server_with_other_tokens_is_reported_not_identical(hf_complete, tmp_path, capsys) -> None:
    def shifted(prompt: str, max_tokens: int):
        tokens = hf_complete(prompt, max_tokens)
        return tokens if prompt.startswith("def") else [*tokens[:-1], (tokens[-1][0] + 1, "?")]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def f(x):", "class A:"]) + "\n")
    out = tmp_path / "side_by_side.json"
    # the other side sends text only: tokens counted from chunks and usage, outputs compared by text
    with FakeOpenAIServer(hf_complete) as ours, FakeOpenAIServer(shifted, send_token_ids=False) as other:
        assert main(compare_flags(ours.base_url, other.base_url, out, "--prompts", str(prompts))) == 0
    result = json.loads(out.read_text())
    assert [level["num_output_tokens"] for level in result["other"]["levels"]] == [32, 32]
    assert [(level["num_identical"], level["first_differing_request"]) for level in result["identical"]] == [(2, 1)] * 2
    assert "NOT identical (first differing request: 1)" in capsys.readouterr().out


def test_a_failed_request_or_a_difference_in_any_repetition_counts_as_differing() -> None:
    def run(*outputs):
        return {"levels": [{"concurrency": 1, "outputs": list(outputs)}]}

    same = {"token_ids": [1, 2], "text": "ab"}
    other = {"token_ids": [1, 3], "text": "ab"}  # same text, other tokens: token ids decide
    (level,) = identical_requests([run(same, same), run(same, same)], [run(same, None), run(same, other)])
    assert (level["num_identical"], level["first_differing_request"]) == (1, 1)
    (level,) = identical_requests([run(same)], [run({"token_ids": [], "text": "ab"})])  # no ids: by text
    assert level["num_identical"] == 1


def test_compare_url_does_not_combine_with_launch(capsys) -> None:
    assert main(["bench", "serve", "--launch", "--compare-url", "http://127.0.0.1:1/v1"]) == 2
    assert "does not combine with --launch" in capsys.readouterr().err
