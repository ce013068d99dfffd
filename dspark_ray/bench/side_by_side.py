"""`dspark-ray bench serve --compare-url URL`: this server and another OpenAI-compatible one (vLLM,
say) under the same client, prompts, request lengths and concurrency levels, repetitions
interleaved (A B, B A, ...); each level reports the median run, the ratios of this server's figures
to the other's, and, greedy, how many requests both answered with the same tokens.

It knows nothing of either server beyond the OpenAI completions API: outputs are compared by token
ids where both servers send them (`return_token_ids`), else by text.
"""

from __future__ import annotations

from typing import Any

from dspark_ray.bench.repetitions import interleaved, median_levels

OURS, OTHER = "dspark-ray", "other"


def bench_side_by_side(bench_one, urls: dict[str, str], repetitions: int, greedy: bool) -> dict[str, Any]:
    """`bench_one(url, label)` runs every level once against one server and keeps its outputs;
    `urls` maps OURS and OTHER to base URLs."""
    reports: dict[str, list[dict[str, Any]]] = {OURS: [], OTHER: []}
    for label, url in interleaved(urls.items(), repetitions):
        reports[label].append(bench_one(url, label))
    result: dict[str, Any] = {label: drop_outputs(median_levels(runs)) for label, runs in reports.items()}
    result["identical"] = identical_requests(reports[OURS], reports[OTHER]) if greedy else None
    return result


def identical_requests(ours: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level: requests whose outputs matched in every repetition (run i of one server against
    run i of the other), out of all; the first that differed, if any. A failed request differs."""
    levels = []
    for level_runs in zip(*(run["levels"] for run in ours), *(run["levels"] for run in other)):
        ours_runs, other_runs = level_runs[:len(ours)], level_runs[len(ours):]
        num_requests = len(ours_runs[0]["outputs"])
        differing = sorted({index for a, b in zip(ours_runs, other_runs) for index in range(num_requests)
                            if not same_output(a["outputs"][index], b["outputs"][index])})
        levels.append({"concurrency": ours_runs[0]["concurrency"], "num_requests": num_requests,
                       "num_identical": num_requests - len(differing),
                       "first_differing_request": differing[0] if differing else None})
    return levels


def same_output(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return False
    if a["token_ids"] and b["token_ids"]:
        return a["token_ids"] == b["token_ids"]
    return a["text"] == b["text"]


def drop_outputs(report: dict[str, Any]) -> dict[str, Any]:
    return {**report, "levels": [{k: v for k, v in level.items() if k != "outputs"} for level in report["levels"]]}


def format_identical(levels: list[dict[str, Any]] | None) -> str:
    if levels is None:
        return "outputs not compared (not greedy: temperature > 0)"
    lines = []
    for level in levels:
        verdict = ("identical" if level["first_differing_request"] is None
                   else f"NOT identical (first differing request: {level['first_differing_request']})")
        lines.append(f"c={level['concurrency']}: {level['num_identical']}/{level['num_requests']} requests "
                     f"with the same output on both servers in every repetition: {verdict}")
    return "\n".join(lines)
