"""`dspark-ray bench admission` end to end on the bundled models, kept small: both ways run,
every figure is measured, and their outputs are compared token for token."""

from __future__ import annotations

import argparse

from dspark_ray.bench import cli
from dspark_ray.bench.admission import bench, report


def test_bench_admission_compares_both_ways_on_the_same_requests(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "admission", "--drafter", "none", "--batch-size", "4", "--num-samples", "2",
                              "--concurrency", "3", "--num-requests", "6", "--max-tokens", "8",
                              "--repetitions", "1", "--json", str(tmp_path / "out.json")])

    result = bench(args)

    assert result["identical_outputs"] is True
    for way in ("fused", "apart"):
        figures = result["medians"][way]
        assert figures["plain_step_ms"] > 0 and figures["admitting_step_ms"] > 0 and figures["tokens_per_s"] > 0
    assert "fused / apart" in report(result)
