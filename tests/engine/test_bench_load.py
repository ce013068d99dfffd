"""`dspark-ray bench load` end to end on the bundled models, kept small: a drafter and the target
alone run the same requests, every figure is measured, and the outputs are compared."""

from __future__ import annotations

import argparse
import json

import pytest

from dspark_ray.bench import cli, load

pytestmark = pytest.mark.engine


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", "load", *flags])


@pytest.mark.parametrize("drafter", ["model", "dspark"])
def test_bench_load_runs_a_drafter_beside_the_target_alone(drafter, tmp_path, capsys) -> None:
    out = tmp_path / "out.json"
    args = parse("--drafter", drafter, "--concurrency", "1,3", "--num-requests", "4", "--max-tokens", "8",
                 "--max-tokens-range", "0.5", "--repetitions", "2", "--json", str(out))

    assert load.run(args) == 0

    result = json.loads(out.read_text())
    assert [level["concurrency"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert set(level["tokens_per_s"]) == {"none", drafter}
        assert all(len(runs) == 2 and min(runs) > 0 for runs in level["tokens_per_s_runs"].values())
        assert level["identical_to_target_only"] == {drafter: True}
        ratio = level["tokens_per_s"][drafter] / level["tokens_per_s"]["none"]
        assert level["ratio_to_target_only"][drafter] == pytest.approx(ratio)
    assert f"{drafter:8s}" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--drafter", "none"], ["--concurrency", "0"], ["--max-tokens-range", "1"]])
def test_bench_load_refuses_bad_flags(flags, capsys) -> None:
    assert load.run(parse(*flags)) == 2
    assert "dspark-ray bench load: error" in capsys.readouterr().err
