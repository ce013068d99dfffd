"""`dspark-ray bench admission` end to end on the bundled models, kept small: both ways run,
every figure is measured, and their outputs are compared token for token."""

from __future__ import annotations

import argparse

import pytest

from dspark_ray.bench import cli
from dspark_ray.bench.admission import bench, report

pytestmark = pytest.mark.engine


def test_bench_admission_compares_both_ways_on_the_same_requests(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "admission", "--drafter", "none", "--batch-size", "4", "--num-samples", "2",
                              "--concurrency", "3", "--num-requests", "6", "--max-tokens", "8",
                              "--repetitions", "1", "--prompt-tokens", "4,30", "--json", str(tmp_path / "out.json")])

    result = bench(args)

    assert result["identical_outputs"] is True
    for way in ("fused", "apart"):
        figures = result["medians"][way]
        assert figures["plain_step_ms"] > 0 and figures["admitting_step_ms"] > 0 and figures["tokens_per_s"] > 0
    assert "fused / apart" in report(result)
    assert [row["prompt_tokens"] for row in result["by_prompt_tokens"]] == [4, 30]
    assert all(row["fused_admission_ms"] and row["apart_admission_ms"] for row in result["by_prompt_tokens"])
    assert result["fused_prompt_limit"] == 63  # the bundled MLA target: as far as absorbed attention pays


def test_bench_admission_refuses_bad_prompt_lengths(capsys) -> None:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "admission", "--prompt-tokens", "0,4"])
    assert "prompt lengths must be >= 1" in capsys.readouterr().err
