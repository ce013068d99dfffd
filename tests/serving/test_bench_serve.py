"""`dspark-ray bench serve` against the session's Serve app, and its report arithmetic."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from dspark_ray.bench.serve import (RequestResult, baseline_app, bench, check_local, compare, cpu_affinity,
                                    level_report, median_levels, request_lengths, run_level)
from dspark_ray.cli import main


def test_bench_against_a_live_server(served_app, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def f(x):", "class A:"]) + "\n")
    out = tmp_path / "result.json"
    status = main(["bench", "serve", "--url", served_app.base_url, "--concurrency", "1,2", "--num-requests", "4",
                   "--max-tokens", "8", "--ignore-eos", "--prompts", str(prompts), "--json", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert result["model"] == served_app.config.model_name
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["num_errors"] == 0 and level["num_requests"] == 4
        assert level["num_output_tokens"] == 4 * 8
        assert level["output_tokens_per_s"] > 0 and level["request_throughput"] > 0
        assert level["ttft_ms"]["p50"] > 0 and level["tpot_ms"]["mean"] > 0 and level["itl_ms"]["p99"] > 0
        assert level["mean_acceptance_length"] >= 1.0


def test_requests_of_drawn_lengths_against_a_live_server(served_app, tmp_path) -> None:
    out = tmp_path / "result.json"
    status = main(["bench", "serve", "--url", served_app.base_url, "--concurrency", "2", "--num-requests", "4",
                   "--max-tokens", "8", "--max-tokens-range", "0.5", "--ignore-eos", "--json", str(out)])
    assert status == 0
    (level,) = json.loads(out.read_text())["levels"]
    assert level["num_errors"] == 0 and level["num_output_tokens"] == sum(request_lengths(8, 0.5, 4))


def test_refused_requests_are_counted_as_errors_with_status_and_code(served_app) -> None:
    level = asyncio.run(run_level(served_app.base_url, "no-such-model", ["def f(x):"], concurrency=2, num_requests=3,
                                  max_tokens=[4], temperature=0.0, ignore_eos=True))
    assert level["num_errors"] == 3 and level["errors"] == ["404 model_not_found"]
    assert level["num_output_tokens"] == 0


def test_a_server_that_is_not_there_is_a_counted_error_not_a_crash() -> None:
    from dspark_ray.serving.ports import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    level = asyncio.run(run_level(url, "m", ["x"], concurrency=1, num_requests=2, max_tokens=[4], temperature=0.0,
                                  ignore_eos=True))
    assert level["num_errors"] == 2 and level["errors"] == ["ClientConnectorError"]


def test_drawn_lengths_are_the_same_on_every_run_and_stay_in_range() -> None:
    assert request_lengths(64, 0.0, 100) == [64]
    lengths = request_lengths(64, 0.5, 100)
    assert lengths == request_lengths(64, 0.5, 100)  # both apps and every repetition send these
    assert min(lengths) >= 32 and max(lengths) <= 96 and len(set(lengths)) > 10
    assert min(request_lengths(1, 0.9, 50)) >= 1


def test_a_range_outside_0_to_1_is_refused(capsys) -> None:
    assert main(["bench", "serve", "--max-tokens-range", "1.5"]) == 2
    assert "--max-tokens-range must be in [0, 1)" in capsys.readouterr().err


def test_only_this_machine_is_loaded() -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        check_local("http://example.com:8000/v1")
    with pytest.raises(ValueError):
        bench("http://10.0.0.5:8000/v1", ["x"], [1], 1, 4, 0.0, False, model="m")
    check_local("http://localhost:8000/v1")


def test_report_and_comparison() -> None:
    fast = [RequestResult(True, num_output_tokens=10, ttft_s=0.1, e2e_s=1.0, itl_s=[0.1] * 9, num_steps=5,
                          num_accepted_tokens=5) for _ in range(4)]
    report = level_report(4, fast + [RequestResult(False, error="429 over_capacity")], duration_s=2.0)
    assert report["request_throughput"] == 2.0 and report["output_tokens_per_s"] == 20.0
    assert report["num_errors"] == 1 and report["errors"] == ["429 over_capacity"]
    assert report["tpot_ms"]["mean"] == pytest.approx(100.0) and report["mean_acceptance_length"] == 2.0
    target_only = {"url": "a", "label": "target_only", "levels": [{**report, "output_tokens_per_s": 10.0}]}
    speculative = {"url": "b", "label": "speculative", "levels": [report]}
    table = compare(target_only, speculative)
    assert "2.00x" in table and "speculative" in table


def test_repetitions_report_the_median_run_of_each_level() -> None:
    def report(*rates):
        return {"label": "speculative", "levels": [{"concurrency": c, "output_tokens_per_s": rate, "run": rate}
                                                   for c, rate in zip((1, 16), rates)]}

    merged = median_levels([report(10, 300), report(30, 100), report(20, 200)])
    assert merged["label"] == "speculative"
    assert [level["run"] for level in merged["levels"]] == [20, 200]  # each level's own median run
    assert merged["levels"][1]["output_tokens_per_s_runs"] == [300, 100, 200]


def test_repetitions_alternate_which_one_goes_first() -> None:
    from dspark_ray.bench.repetitions import interleaved

    assert "".join(interleaved("AB", 5)) == "ABBAABBAAB"
    assert list(interleaved({"x": 1, "y": 2}.items(), 2)) == [("x", 1), ("y", 2), ("y", 2), ("x", 1)]


def test_comparison_gives_the_ratio_of_each_repetition_in_run_order() -> None:
    def report(label, rate):
        return {"label": label, "levels": [{"concurrency": 16, "output_tokens_per_s": rate, "tpot_ms": {"mean": 1.0},
                                            "mean_acceptance_length": None}]}

    baseline = median_levels([report("target_only", rate) for rate in (100, 200, 400)])
    speculative = median_levels([report("speculative", rate) for rate in (300, 100, 200)])
    row = compare(baseline, speculative).splitlines()[1]
    assert "1.00x" in row and row.endswith("3.00, 0.50, 0.50")  # medians 200 / 200; per run in order
    assert compare(report("target_only", 100), report("speculative", 150)).splitlines()[1].endswith("-")


def test_cpu_affinity_pins_the_calling_thread_for_a_while() -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    with cpu_affinity((cpu,)):
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before
    with cpu_affinity(None):
        assert os.sched_getaffinity(0) == before


def test_launch_baselines() -> None:
    from dspark_ray.serving.config import AppConfig

    speculative = AppConfig.model_validate({"engine": {"drafter": "dspark"}, "workers": {"engine_cpus": [0]},
                                            "max_ongoing_requests": 16})
    name, target_only = baseline_app("target-only", speculative)
    assert name == "target_only" and target_only.engine.drafter == "none"
    assert target_only.workers == speculative.workers and target_only.max_ongoing_requests == 16
    name, thread = baseline_app("engine-thread", speculative)
    assert name == "engine_thread" and thread.engine == speculative.engine
    assert thread.workers.engine_process is False and thread.workers.engine_cpus is None
    name, other = baseline_app("other-router", speculative)
    assert name == "other_router" and other.colocate_router is True and other.engine == speculative.engine
    name, unfused = baseline_app("other-prefill", speculative)
    assert name == "other_prefill" and unfused.engine.fused_prefill is False
    assert unfused.engine.drafter == "dspark" and unfused.colocate_router is False
    assert speculative.workers.engine_process is True  # the speculative app itself is untouched
    assert speculative.colocate_router is False and speculative.engine.fused_prefill is True


def test_burst_report_counts_rejections_and_what_they_lacked() -> None:
    from dspark_ray.bench.burst import report

    results = [RequestResult(True, num_output_tokens=4, ttft_s=0.2, e2e_s=0.5, status=200),
               RequestResult(False, error="429 over_capacity", e2e_s=0.01, status=429, retry_after="1"),
               RequestResult(False, error="429 over_capacity", e2e_s=0.03, status=429, retry_after=None),
               RequestResult(False, error="JSONDecodeError", e2e_s=0.02, status=503, retry_after="1"),
               RequestResult(False, error="ClientConnectorError", e2e_s=0.02)]
    summary = report(results)
    assert summary["statuses"] == {"200": 1, "429": 2, "503": 1, "None": 1}
    assert (summary["num_admitted"], summary["num_rejected"]) == (1, 3)
    assert summary["rejected_without_retry_after"] == 1 and summary["rejected_without_openai_body"] == 1
    assert summary["rejected_answered_ms"]["p99"] == pytest.approx(30.0)
    assert summary["admitted_ttft_ms"]["p50"] == pytest.approx(200.0)
    assert summary["other_errors"] == ["ClientConnectorError"]
