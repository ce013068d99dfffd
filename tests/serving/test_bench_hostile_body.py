"""`dspark-ray bench hostile-body` against the session's Serve app: every kind gets its 4xx while
the streams it opened run to their end (figures are printed, not checked)."""

from __future__ import annotations

import json

import pytest

from dspark_ray.bench.hostile_body import largest_gap
from dspark_ray.cli import main


@pytest.mark.parametrize(("kind", "status", "code"), [("body", 413, "request_too_large"),
                                                      ("prompt", 400, "context_length_exceeded"),
                                                      ("chat", 400, "context_length_exceeded")])
def test_bench_against_a_live_server(served_app, capsys, kind: str, status: int, code: str) -> None:
    assert main(["bench", "hostile-body", "--url", served_app.base_url, "--kind", kind, "--streams", "2",
                 "--max-tokens", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["status"], result["code"]) == (status, code)
    assert len(result["largest_gap_s"]) == 2 and min(result["deltas"]) >= 2
    assert served_app.wait_until_idle() == 0


def test_largest_gap_counts_the_gaps_that_overlap_the_window() -> None:
    arrivals = [0.0, 1.0, 5.0, 5.5, 9.0]
    assert largest_gap(arrivals, 5.2, 5.3) == 0.5
    assert largest_gap(arrivals, 2.0, 3.0) == 4.0
    assert largest_gap(arrivals, 10.0, 11.0) == 0.0
