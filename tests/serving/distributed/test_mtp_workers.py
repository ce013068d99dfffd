"""The MTP drafter on the distributed draft worker: the tiny DeepSeek-V3 target with an MTP layer,
greedy output identical to the in-process engine (and so to the target alone) at TP 1 and 2, with
the pipelined step strategy and without it (Sync commands after each step), the target's
last-layer states reaching the worker from rank 0."""

from __future__ import annotations

import pytest

from dspark_ray.config import EngineConfig
from tiny_models import build_mtp_target
from conftest import greedy_requests, outputs


@pytest.fixture(scope="module")
def mtp_config(tmp_path_factory) -> EngineConfig:
    directory = tmp_path_factory.mktemp("mtp-target")
    build_mtp_target(directory)
    return EngineConfig(target=directory, drafter="mtp", num_speculative_tokens=3, load_aware_drafting=False)


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_mtp_worker_greedy_identity(engines_for, local_outputs, mtp_config, tp) -> None:
    engine, _ = engines_for(mtp_config, tp=tp)
    engine.pipelining = "on"
    seqs = engine.generate(greedy_requests())
    assert outputs(seqs) == local_outputs(mtp_config, greedy_requests())
    assert sum(seq.stats.num_draft_tokens for seq in seqs) > 0  # the worker drafted: it got the states


def test_mtp_worker_unpipelined_with_sync_commands(engines_for, local_outputs, mtp_config) -> None:
    engine, _ = engines_for(mtp_config, tp=1)
    try:
        engine.pipelining = "off"
        engine.verifier.inline_sync = engine.drafter.inline_sync = False
        assert outputs(engine.generate(greedy_requests())) == local_outputs(mtp_config, greedy_requests())
    finally:
        engine.pipelining = "auto"
        engine.verifier.inline_sync = engine.drafter.inline_sync = True
