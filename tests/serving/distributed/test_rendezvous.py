"""Rank 0's rendezvous store holds its port from the moment the port is known: no other socket can
take it between the choice and the group's start (the race that `free_port` then bind had)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from dspark_ray.serving.distributed.tensor_parallel import open_rendezvous
from dspark_ray.serving.ports import port_is_free


def test_the_rendezvous_port_is_held_before_it_is_handed_out() -> None:
    store = open_rendezvous("127.0.0.1", world_size=2, timeout_s=10)
    assert store.port > 0
    assert not port_is_free(store.port)
    follower = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=timedelta(seconds=10))
    follower.set("rank1", "joined")
    assert store.get("rank1") == b"joined"
